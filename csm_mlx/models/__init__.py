from .csm import FLAVORS, LLAMA3_ROPE_SCALING, Model, ModelArgs, TransformerArgs

__all__ = ["FLAVORS", "LLAMA3_ROPE_SCALING", "Model", "ModelArgs", "TransformerArgs"]
