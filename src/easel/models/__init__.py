"""easel.models"""
