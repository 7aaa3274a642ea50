"""easel.ui"""
