"""easel.ui: the web page (Gradio Blocks over ``services``), mounted at "/" by the API app."""

from easel.ui.app import build_ui, mount_ui

__all__ = ["build_ui", "mount_ui"]
