"""easel.training"""
