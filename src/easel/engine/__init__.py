"""easel.engine"""
