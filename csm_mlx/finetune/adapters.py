"""What fine-tuning changes, kept apart from the base model: LoRA layers (mlx-lm's LoRALinear)
or, for full fine-tuning, the trained weights themselves.

An adapter directory holds adapter_config.json and adapters.safetensors, as mlx-lm writes them;
the config also records the sizes of the model the adapter was made for.
"""

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..models import Model
from ..options import OptionError, Rule, check_mapping, syntax_error
from .files import write_atomically

CONFIG_FILE = "adapter_config.json"
ADAPTER_FILE = "adapters.safetensors"
FINE_TUNE_TYPES = ("lora", "full")
# The attention and MLP projections of a Llama block.
LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# alpha / r = 1, as the CSM recipes (Unsloth: r 32, alpha 32); mlx-lm's default scale of 20
# would make each LoRA step 20x larger than theirs at the same learning rate.
LORA_PARAMETERS = {"rank": 32, "scale": 1.0, "dropout": 0.0}
LORA_FIELDS = {"rank": Rule(int, 1, 4096), "scale": Rule(float, 0.0, 1e4, positive=True), "dropout": Rule(float, 0.0, 0.99)}
NUM_LAYERS = Rule(int, -1, 256)  # -1: all
_STACK = Rule(list, items=Rule(int, 0, 1 << 20), length=6, required=True)
# adapter_config.json as adapter_config writes it; the training run's values are kept for the record.
CONFIG_FIELDS = {
    "fine_tune_type": Rule(str, choices=FINE_TUNE_TYPES, required=True),
    "num_layers": replace(NUM_LAYERS, required=True),
    "lora_parameters": Rule(dict, optional=True, fields={**LORA_FIELDS, "keys": Rule(list, items=Rule(str))}),
    "model": Rule(dict, required=True, fields={
        "backbone": _STACK, "decoder": _STACK, "text_vocab_size": Rule(int, 1, required=True),
        "audio_vocab_size": Rule(int, 1, required=True), "audio_num_codebooks": Rule(int, 1, required=True)}),
    **{name: Rule(str, optional=True) for name in ("base_model", "data")},
    **{name: Rule(int, optional=True) for name in ("iters", "batch_size", "seed")},
    **{name: Rule(float, optional=True) for name in ("learning_rate", "depth_decoder_ratio")},
}


class AdapterError(ValueError):
    """An adapter that cannot be used with this model; the message says why."""


def model_sizes(model: Model) -> Dict[str, Any]:
    """What an adapter depends on: the sizes of both stacks and the vocabularies (not RoPE
    settings, which differ in form, not in value, between the two hub formats)."""
    a = model.args
    stack = lambda t: [t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size]
    return {"backbone": stack(a.backbone), "decoder": stack(a.decoder), "text_vocab_size": a.text_vocab_size,
            "audio_vocab_size": a.audio_vocab_size, "audio_num_codebooks": a.audio_num_codebooks}


def _backbone_layers(model: Model, num_layers: int) -> int:
    n = len(model.backbone.layers)
    return n if num_layers < 0 else min(num_layers, n)


def add_lora(model: Model, num_layers: int, parameters: Dict[str, Any]) -> None:
    """Freeze the model and put LoRA on the projections of its last num_layers backbone layers
    (-1: all) and of every depth-decoder layer."""
    config = {**parameters, "keys": LORA_KEYS}
    model.freeze()
    linear_to_lora_layers(model.backbone, _backbone_layers(model, num_layers), config)
    linear_to_lora_layers(model.decoder, len(model.decoder.layers), config)


def unfreeze_full(model: Model, num_layers: int) -> None:
    """Full fine-tuning: train the last num_layers backbone layers (-1: all), the backbone's
    final norm, the depth decoder, its input projection and every codebook head. The text and
    audio embeddings (400M of the 1.55B parameters) stay frozen: with Adam they would need 4.8 GB
    more memory, and a voice lives in how the model reads them, not in them."""
    model.freeze()
    for layer in model.backbone.layers[len(model.backbone.layers) - _backbone_layers(model, num_layers):]:
        layer.unfreeze()
    for module in (model.backbone.norm, model.decoder, model.projection, model.codebook0_head, *model.audio_head):
        module.unfreeze()


def prepare_model(model: Model, fine_tune_type: str, num_layers: int,
                  lora_parameters: Optional[Dict[str, Any]] = None) -> None:
    if fine_tune_type == "lora":
        add_lora(model, num_layers, {**LORA_PARAMETERS, **(lora_parameters or {})})
    elif fine_tune_type == "full":
        unfreeze_full(model, num_layers)
    else:
        raise ValueError(f"unknown fine-tune type {fine_tune_type!r}: use {' or '.join(FINE_TUNE_TYPES)}")


def adapter_config(model: Model, fine_tune_type: str, num_layers: int,
                   lora_parameters: Optional[Dict[str, Any]] = None, **training) -> Dict[str, Any]:
    """The adapter_config.json of an adapter for model; training arguments are kept for the record."""
    config = {"fine_tune_type": fine_tune_type, "num_layers": num_layers,
              "lora_parameters": {**LORA_PARAMETERS, **(lora_parameters or {}), "keys": LORA_KEYS},
              "model": model_sizes(model)}
    return {**config, **training}


def save_config(adapter_path: os.PathLike, config: Dict[str, Any]) -> None:
    adapter_path = Path(adapter_path)
    adapter_path.mkdir(parents=True, exist_ok=True)
    write_atomically(adapter_path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def save_adapters(model: Model, path: os.PathLike) -> None:
    """The trained parameters to a .safetensors file, replaced at once (never half-written)."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    write_atomically(Path(path), lambda tmp: mx.save_safetensors(tmp, weights, metadata={"format": "mlx"}))


def read_config(adapter_path: os.PathLike) -> Dict[str, Any]:
    """The adapter's config, every key checked, before any model is loaded."""
    path = Path(adapter_path) / CONFIG_FILE
    fix = "point --adapter-path to a directory that csm-mlx finetune wrote"
    if not Path(adapter_path).is_dir():
        raise AdapterError(f"adapter directory {adapter_path} {'is a file' if Path(adapter_path).exists() else 'does not exist'}: {fix}")
    if not path.is_file():
        raise AdapterError(f"{adapter_path} has no {CONFIG_FILE}: {fix}")
    try:
        config = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise AdapterError(f"{path} is not UTF-8 JSON: {fix}") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path} is not valid JSON ({syntax_error(e)}): {fix}") from None
    try:
        config = check_mapping(config, CONFIG_FIELDS, str(path))
    except OptionError as e:
        raise AdapterError(f"{e}: {fix}") from None
    if config["fine_tune_type"] == "lora" and config.get("lora_parameters") is None:
        raise AdapterError(f"{path} is a LoRA adapter without lora_parameters: {fix}")
    return config


def load_adapters(model: Model, adapter_path: os.PathLike) -> Model:
    """Apply the adapter in adapter_path to model (in place) and return it."""
    config = read_config(adapter_path)
    if config["model"] != model_sizes(model):
        made, this = config["model"], model_sizes(model)
        raise AdapterError(
            f"adapter {adapter_path} was made for another model (backbone {_describe(made['backbone'])}, depth "
            f"decoder {_describe(made['decoder'])}); this one has backbone {_describe(this['backbone'])}, depth "
            f"decoder {_describe(this['decoder'])}: load the model it was fine-tuned from"
        )
    if config["fine_tune_type"] == "lora":
        add_lora(model, config["num_layers"], config["lora_parameters"])
    return load_weights(model, Path(adapter_path) / ADAPTER_FILE)


def load_weights(model: Model, path: os.PathLike) -> Model:
    """Load an adapters .safetensors file into a model prepared for it (LoRA layers in place)."""
    try:
        weights = mx.load(str(path))
    except Exception as e:  # MLX raises bare RuntimeError/ValueError for missing or bad files
        raise AdapterError(f"{path} cannot be read as safetensors ({' '.join(str(e).split())})") from None
    if not isinstance(weights, dict):
        raise AdapterError(f"{path} is not a safetensors file of adapter weights")
    for name, w in weights.items():
        if mx.issubdtype(w.dtype, mx.floating) and not mx.all(mx.isfinite(w)).item():
            raise AdapterError(f"{path} holds NaN or infinite values ({name}): it was saved by a training run that "
                               "diverged; train again with a lower --learning-rate")
    params = dict(tree_flatten(model.parameters()))
    for name, w in weights.items():
        if name not in params or params[name].shape != w.shape:
            have = f" (it has {tuple(params[name].shape)})" if name in params else ""
            raise AdapterError(f"{path} holds {name} {tuple(w.shape)}, which this model does not have{have}: "
                               "it was made for another model or fine-tune type")
    model.load_weights([(k, w.astype(params[k].dtype)) for k, w in weights.items()], strict=False)
    mx.eval(model.parameters())
    return model


def _describe(sizes) -> str:
    layers, dim = sizes[0], sizes[1]
    return f"{layers} layers of {dim}"


def fuse(model: Model) -> Model:
    """Fold every LoRA layer into its linear layer (in place): the plain model the adapter makes."""
    fused = [(name, module.fuse()) for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model
