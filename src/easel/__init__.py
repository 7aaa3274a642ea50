"""Easel: a self-hosted image-generation studio and API."""

__version__ = "0.1.0"
