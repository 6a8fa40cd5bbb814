"""csm-mlx: Sesame's Conversational Speech Model (CSM-1b) on Apple MLX."""

from . import blas  # noqa: F401  (first: it must run before mlx.core is loaded)

# The public names load on first use (PEP 562): importing the package (the CLI does, to
# start) stays quick, so a Ctrl-C while the CLI starts up meets its own handler.
_EXPORTS = {
    "CSM": "api",
    "Conversation": "conversation",
    "CheckpointError": "checkpoint",
    "load_model": "checkpoint",
    "Segment": "segment",
    "Speech": "segment",
    "Model": "models",
    "ModelArgs": "models",
    "TransformerArgs": "models",
    "TokenizedSegment": "frames",
    "generate": "frames",
    "generate_frames": "frames",
    "make_frame_sampler": "frames",
    "prompt_rows": "frames",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'csm_mlx' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
