"""easel.jobs"""
