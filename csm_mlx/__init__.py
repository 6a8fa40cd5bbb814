"""csm-mlx: Sesame's Conversational Speech Model (CSM-1b) on Apple MLX."""

from . import blas  # noqa: F401  (first: it must run before mlx.core is loaded)

from .checkpoint import CheckpointError, load_model
from .conversation import Conversation
from .api import CSM
from .segment import Segment, Speech
from .frames import TokenizedSegment, generate, generate_frames, make_frame_sampler, prompt_rows
from .models import Model, ModelArgs, TransformerArgs

__all__ = [
    "CSM",
    "Conversation",
    "CheckpointError",
    "Segment",
    "Speech",
    "Model",
    "ModelArgs",
    "TokenizedSegment",
    "TransformerArgs",
    "generate",
    "generate_frames",
    "load_model",
    "make_frame_sampler",
    "prompt_rows",
]
