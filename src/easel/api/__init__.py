"""easel.api"""
