"""csm-mlx: Sesame's Conversational Speech Model (CSM-1b) on Apple MLX."""

from . import blas  # noqa: F401  (first: on Linux it loads MKL, which must happen before mlx.core loads)

# The public names load on first use (PEP 562): importing the package (the CLI does, to
# start) stays quick, so a Ctrl-C while the CLI starts up meets its own handler.
_EXPORTS = {
    "CSM": "api",
    "Segment": "segment",
    "Speech": "segment",
    "Conversation": "conversation",
    "load_model": "checkpoint",
    "CheckpointError": "checkpoint",
    "OptionError": "options",
    "ContextError": "context",
    "AudioError": "audio",
    "CodecError": "codec",
    "HubError": "hub",
    "TokenizerError": "tokenizer",
    "EngineError": "engine",
    "EngineFull": "engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'csm_mlx' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
