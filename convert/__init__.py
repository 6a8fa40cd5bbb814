"""Checkpoint conversion to MLX (the `csm-mlx-convert` command)."""

from .convert import convert, main

__all__ = ["convert", "main"]
