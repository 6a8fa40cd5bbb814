"""The OpenAI-compatible speech server: `csm-mlx serve`, or build_app() for any ASGI server.

Needs the `server` extra (FastAPI, uvicorn, python-multipart, lameenc, PyAV)."""

from .app import build_app

__all__ = ["build_app"]
