"""Reading CSM checkpoints (original Sesame, transformers, or converted MLX) and writing MLX ones."""

import json
import os
import secrets
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .audio import write_error
from .codec import NUM_CODEBOOKS
from .models import FLAVORS, Model, ModelArgs, TransformerArgs
from .options import AUDIO_CODES, OptionError, Rule, check_mapping, syntax_error

MLX_MODEL_TYPE = "csm_mlx"
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as CSM; the message says what to do."""


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path.parent} has no config.json: point to a csm-1b checkpoint directory "
            "(original, transformers or converted MLX)"
        ) from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 JSON: download it again") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({syntax_error(e)}): download it again") from None


def _transformer_args_from_hf(cfg: Dict[str, Any]) -> TransformerArgs:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    theta = cfg.get("rope_theta") or (rope.get("rope_theta", 500_000.0) if isinstance(rope, dict) else 500_000.0)
    if isinstance(rope, dict):  # anything else is left for _check_sizes to name
        # transformers 4.x wrote the type as "type"; 5.x as "rope_type", with theta inside
        rope = {("rope_type" if k == "type" else k): v for k, v in rope.items() if k != "rope_theta"}
        if (rope.get("rope_type") or rope.get("type")) in (None, "default"):
            rope = None
    return TransformerArgs(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        head_dim=cfg.get("head_dim"),
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=rope,
    )


# Plausible ranges for a CSM config, checked before anything is allocated: csm-1b sits well
# inside them, and a config outside them is corrupt or not CSM (a million layers would allocate
# until the machine runs out).
STACK_LIMITS = {"num_layers": 256, "hidden_size": 32_768, "num_heads": 512, "num_kv_heads": 512,
                "intermediate_size": 262_144, "head_dim": 1024, "max_seq_len": 1_048_576}
MAX_PARAMETERS = 50e9
# The RoPE settings a Llama config may hold (mlx-lm's initialize_rope reads them by type).
_ROPE_TYPE = Rule(str, choices=("default", "linear", "dynamic", "llama3"))
_FACTOR = Rule(float, 0.0, 1e6, positive=True)
ROPE_FIELDS = {"rope_type": _ROPE_TYPE, "type": _ROPE_TYPE, "factor": _FACTOR, "low_freq_factor": _FACTOR,
               "high_freq_factor": _FACTOR, "original_max_position_embeddings": Rule(int, 1, 1 << 20)}
NORM_EPS = Rule(float, 0.0, 1.0, positive=True)
ROPE_THETA = Rule(float, 0.0, 1e12, positive=True)


def _check_sizes(args: ModelArgs, path: Path) -> None:
    where = f"{path}/config.json"

    def positive_int(name, value, limit):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise CheckpointError(f"{where}: {name} is {value!r}, expected a whole number in 1..{limit}: "
                                  "the file is corrupt or not a CSM config")

    for stack, t in (("backbone", args.backbone), ("depth decoder", args.decoder)):
        for name, limit in STACK_LIMITS.items():
            positive_int(f"the {stack}'s {name}", getattr(t, name), limit)
        if t.num_heads % t.num_kv_heads or t.head_dim % 2:
            raise CheckpointError(f"{where}: the {stack}'s {t.num_heads} heads, {t.num_kv_heads} key/value heads and "
                                  f"head size {t.head_dim} do not fit together (heads must be a multiple of key/value "
                                  "heads, the head size even)")
        try:
            NORM_EPS.check(f"the {stack}'s norm epsilon", t.norm_eps)
            ROPE_THETA.check(f"the {stack}'s rope_theta", t.rope_theta)
            if t.rope_scaling is not None:
                check_mapping(t.rope_scaling, ROPE_FIELDS, f"the {stack}'s RoPE scaling")
                if (t.rope_scaling.get("rope_type") or t.rope_scaling.get("type")) in ("linear", "dynamic", "llama3") \
                        and "factor" not in t.rope_scaling:
                    raise OptionError(f"the {stack}'s RoPE scaling", "lacks the key 'factor'")
        except OptionError as e:
            raise CheckpointError(f"{where}: {e}: the file is corrupt or not a CSM config") from None
    positive_int("text_vocab_size", args.text_vocab_size, 1_048_576)
    positive_int("audio_vocab_size", args.audio_vocab_size, 65_536)
    if not 1 < args.audio_num_codebooks <= NUM_CODEBOOKS or args.audio_vocab_size < AUDIO_CODES:
        raise CheckpointError(f"{where}: {args.audio_num_codebooks} codebooks of {args.audio_vocab_size} codes; "
                              f"a CSM model reads 2 to {NUM_CODEBOOKS} of Mimi's codebooks, of at least {AUDIO_CODES} codes")
    if args.decoder.max_seq_len < args.audio_num_codebooks:
        raise CheckpointError(f"{where}: the depth decoder's {args.decoder.max_seq_len} positions cannot hold "
                              f"{args.audio_num_codebooks} codebooks")
    parameters = parameter_count(args)
    if parameters > MAX_PARAMETERS:
        raise CheckpointError(f"{where} describes a model of {parameters / 1e9:.0f}B parameters (csm-1b has 1.6B): "
                              "the file is corrupt or not a CSM config")


def parameter_count(args: ModelArgs) -> int:
    """Parameters of a model with these sizes, from the config alone."""
    def stack(t):
        attention = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
        return t.num_layers * (attention + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size) + t.hidden_size

    d, dd, k, v = args.backbone.hidden_size, args.decoder.hidden_size, args.audio_num_codebooks, args.audio_vocab_size
    return (stack(args.backbone) + stack(args.decoder) + d * (args.text_vocab_size + v * k + dd + v)
            + (k - 1) * dd * v)


def read_config(path: Path) -> Tuple[str, ModelArgs, Dict[str, Any]]:
    """Return (format, model args, config) for a checkpoint directory, sizes checked.

    format is "original" (Sesame's layout), "transformers", "mlx-audio" or "mlx" (ours)."""
    fmt, args, cfg = _parse_config(path)
    _check_sizes(args, path)
    return fmt, args, cfg


# Checkpoints that ship without a config.json, known by their stacks' flavors, and how their
# text is framed. MisoTTS (MisoLabs/MisoTTS): Llama-3.2's tokenizer, a space after the speaker tag.
WITHOUT_CONFIG = {
    ("llama-8B", "llama-300M"): {"speaker_prefix_space": True, "text_tokenizer": "unsloth/Llama-3.2-1B"},
}


def weight_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor in the directory's model*.safetensors, from their headers
    alone (no weights are read)."""
    shapes = {}
    for f in sorted(path.glob("model*.safetensors")):
        try:
            with open(f, "rb") as file:
                size = int.from_bytes(file.read(8), "little")
                if not 0 < size <= 1 << 27:
                    raise ValueError(f"a header of {size} bytes")
                header = json.loads(file.read(size))
            shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{f} cannot be read as safetensors ({e}): it is truncated or corrupt, "
                                  "download it again") from None
    return shapes


def _stack_from_weights(shapes: Dict[str, Tuple[int, ...]], stack: str) -> Optional[Tuple[str, TransformerArgs]]:
    """(flavor, sizes) of a stack's Sesame-style weights: the flavor whose widths they have, with
    as many layers as they hold."""
    layers = len({k.split(".")[2] for k in shapes if k.startswith(f"{stack}.layers.")})
    first = f"{stack}.layers.0"
    try:
        widths = (shapes[f"{stack}.norm.scale"][0], shapes[f"{first}.mlp.w1.weight"][0],
                  shapes[f"{first}.attn.q_proj.weight"][0], shapes[f"{first}.attn.k_proj.weight"][0])
    except (KeyError, IndexError):
        return None
    for name, t in FLAVORS.items():
        if widths == (t.hidden_size, t.intermediate_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim):
            return name, replace(t, num_layers=layers)
    return None


def _config_from_weights(path: Path) -> Tuple[ModelArgs, Dict[str, Any]]:
    """The sizes and text settings of a known checkpoint that ships without a config (MisoTTS),
    from its weights' shapes."""
    if not any(path.glob("model*.safetensors")):
        _read_json(path / "config.json")  # names what is missing
    shapes = weight_shapes(path)
    backbone, decoder = _stack_from_weights(shapes, "backbone"), _stack_from_weights(shapes, "decoder")
    flavors = (backbone[0] if backbone else None, decoder[0] if decoder else None)
    if flavors not in WITHOUT_CONFIG or "audio_head" not in shapes or "text_embeddings.weight" not in shapes:
        raise CheckpointError(f"{path} has no config.json and its weights are not those of a known CSM model "
                              "(MisoTTS): point to a checkpoint directory with its config.json")
    heads, _, audio_vocab = shapes["audio_head"]
    args = ModelArgs(backbone[1], decoder[1], text_vocab_size=shapes["text_embeddings.weight"][0],
                     audio_vocab_size=audio_vocab, audio_num_codebooks=heads + 1)
    return args, dict(WITHOUT_CONFIG[flavors])


def text_settings(cfg: Dict[str, Any]) -> Tuple[bool, Optional[str]]:
    """(speaker_space, tokenizer repo) of a checkpoint's config: whether a turn's text follows its
    speaker tag after a space, and which hub repo holds its tokenizer when none is beside it.
    A text_tokenizer that is not a hub id (a path on its author's machine) is not used."""
    repo = cfg.get("text_tokenizer")
    if not isinstance(repo, str) or repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        repo = None
    return cfg.get("speaker_prefix_space") is True, repo


def _format(cfg: Dict[str, Any]) -> str:
    if cfg.get("model_type") == "sesame":
        return "mlx-audio"
    return "original" if "backbone_flavor" in cfg else "transformers"


def text_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The text settings of a checkpoint's config, as a converted model's config keeps them."""
    speaker_space, repo = text_settings(cfg)
    return {**({"speaker_prefix_space": True} if speaker_space else {}), **({"text_tokenizer": repo} if repo else {})}


def _parse_config(path: Path) -> Tuple[str, ModelArgs, Dict[str, Any]]:
    if not (path / "config.json").exists() and path.is_dir():
        args, cfg = _config_from_weights(path)
        return "original", args, cfg
    cfg = _read_json(path / "config.json")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}/config.json holds no JSON object: it is not a CSM config")
    try:
        if cfg.get("model_type") == MLX_MODEL_TYPE:
            return "mlx", ModelArgs.from_dict(cfg["model"]), cfg
        if cfg.get("model_type") in ("csm", "sesame") and isinstance(cfg.get("depth_decoder_config"), dict):
            # transformers' CsmConfig; Marvis's own repos and mlx-audio's conversions add
            # Sesame-style fields to it, and the sizes it holds are the ones that count
            dd = cfg["depth_decoder_config"]
            args = ModelArgs(
                backbone=_transformer_args_from_hf(cfg),
                decoder=_transformer_args_from_hf(dd),
                text_vocab_size=cfg["text_vocab_size"],
                audio_vocab_size=cfg.get("vocab_size", cfg.get("audio_vocab_size", 2051)),
                audio_num_codebooks=cfg.get("num_codebooks", cfg.get("audio_num_codebooks", 32)),
            )
            return _format(cfg), args, cfg
        if "backbone_flavor" in cfg:
            for flavor in (cfg["backbone_flavor"], cfg["decoder_flavor"]):
                if flavor not in FLAVORS:
                    raise CheckpointError(
                        f"{path}/config.json names the unknown flavor {flavor!r} "
                        f"(known: {', '.join(FLAVORS)})"
                    )
            args = ModelArgs.from_flavors(
                cfg["backbone_flavor"],
                cfg["decoder_flavor"],
                text_vocab_size=cfg["text_vocab_size"],
                audio_vocab_size=cfg["audio_vocab_size"],
                audio_num_codebooks=cfg["audio_num_codebooks"],
            )
            return _format(cfg), args, cfg
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{path}/config.json lacks the field {e}: it is not a complete CSM config") from None
    except (TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json has a field of the wrong kind ({e}): it is not a CSM config") from None
    raise CheckpointError(
        f"{path}/config.json is not a CSM checkpoint (expected the original Sesame config "
        "with backbone_flavor, a transformers config with model_type 'csm', or a csm-mlx conversion)"
    )


def read_weights(path: Path) -> Dict[str, mx.array]:
    # model.safetensors or shards model-0000N-of-0000M.safetensors; other safetensors
    # files (a bundled Mimi) are not CSM weights.
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no model*.safetensors weights: the download is incomplete")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # MLX raises bare RuntimeError/ValueError for bad files
            raise CheckpointError(
                f"{f} cannot be read as safetensors ({e}): it is truncated or corrupt, download it again"
            ) from None
    return weights


def _check_weights(model: Model, weights: Dict[str, mx.array], path: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape (first: {wrong[0]})")
    if problems:
        raise CheckpointError(
            f"weights in {path} do not match its config.json: {'; '.join(problems)}"
        )


def _is_quantizable(group_size: int):
    def predicate(_, module):
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    return predicate


def load_model(
    path: os.PathLike, dtype: Optional[str] = None, lazy: bool = False
) -> Tuple[Model, Dict[str, Any]]:
    """Build a Model from a local checkpoint directory in any supported format.

    dtype ("float32", "bfloat16", "float16") casts float weights of an
    unquantized checkpoint; None keeps them as stored. Returns (model, info),
    info holding "format", "dtype" and "quantization".
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    fmt, args, cfg = read_config(path)
    model = Model(args)
    weights = model.sanitize(read_weights(path))
    quantization = cfg.get("quantization") if fmt in ("mlx", "mlx-audio") else None
    if quantization:
        _check_quantization_config(quantization, path)
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=lambda p, m: f"{p}.scales" in weights,
        )
    _check_weights(model, weights, path)
    if dtype is not None:
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        if quantization and dtype != cfg.get("dtype"):
            raise CheckpointError(
                f"{path} is quantized in {cfg.get('dtype')}: load it without a dtype or convert again"
            )
        weights = {
            k: v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()))
    if not lazy:
        mx.eval(model.parameters())
    info = {
        "format": fmt,
        "dtype": str(weights["backbone.norm.weight"].dtype).split(".")[-1],
        "quantization": quantization,
    }
    return model, info


def _check_quantization_config(quantization: Any, path: Path) -> None:
    if not isinstance(quantization, dict) or quantization.get("bits") not in (2, 3, 4, 5, 6, 8) \
            or quantization.get("group_size") not in (32, 64, 128) or quantization.get("mode", "affine") != "affine":
        raise CheckpointError(f"{path}/config.json: quantization {quantization!r} is not one MLX reads "
                              "(affine, 2-8 bits, groups of 32, 64 or 128): convert the model again")


def check_finite(model: Model, what: str) -> None:
    """Refuse a model whose weights hold NaN or infinity (a diverged fine-tune, a corrupt file)."""
    for name, w in tree_flatten(model.parameters()):
        if mx.issubdtype(w.dtype, mx.floating) and not mx.all(mx.isfinite(w)).item():
            raise CheckpointError(f"{what} holds NaN or infinite weights ({name}): it cannot be used")


def check_quantization(bits: int, group_size: int) -> None:
    if bits not in (4, 8):
        raise CheckpointError(f"--q-bits {bits} is not supported: use 4 or 8")
    if group_size not in (32, 64, 128):
        raise CheckpointError(f"--q-group-size {group_size} is not supported: use 32, 64 or 128")


def quantize(model: Model, bits: int, group_size: int) -> None:
    check_quantization(bits, group_size)
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=_is_quantizable(group_size))


def save_model(
    model: Model,
    path: os.PathLike,
    dtype: str,
    quantization: Optional[dict],
    extra_files: Optional[Dict[str, Path]] = None,
    text: Optional[Dict[str, Any]] = None,
) -> None:
    """Write config.json + model.safetensors (+ extra_files, name -> source) into a new
    directory, atomically. text: the source config's text settings (speaker_prefix_space,
    text_tokenizer), kept in the new config.

    The files are written into a temporary sibling that is renamed into place,
    so an interrupted conversion never leaves a half-written model behind."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path} already exists: choose a new --mlx-path or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkdtemp: its 0700 would stay on the model directory; mkdir applies the umask
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.part"
    tmp.mkdir()
    weights = tmp / "model.safetensors"
    try:
        config = {
            "model_type": MLX_MODEL_TYPE,
            "model": model.args.to_dict(),
            "dtype": dtype,
            "quantization": quantization,
            **(text or {}),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        try:
            mx.save_safetensors(str(weights), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
        except RuntimeError:  # MLX's "[write] Unable to write N bytes" does not say why
            raise CheckpointError(f"cannot write {path}: {write_error(weights)}") from None
        for name, source in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
        if path.exists():
            path.rmdir()
        tmp.rename(path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write {path}: {(e.strerror or str(e)).lower()}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
