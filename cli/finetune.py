"""`csm-mlx finetune`: LoRA or full fine-tuning on a directory of clips, with mlx_lm.lora's flags and files."""

import argparse
import inspect
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.optimizers as optim
import yaml
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import TrainingArgs
from mlx_lm.tuner.utils import build_schedule

from csm_mlx import hub
from csm_mlx.api import CSM
from csm_mlx.checkpoint import DTYPES
from csm_mlx.finetune.adapters import (ADAPTER_FILE, CONFIG_FILE, FINE_TUNE_TYPES, LORA_FIELDS, LORA_PARAMETERS,
                                       NUM_LAYERS, adapter_config, load_weights, prepare_model, save_config)
from csm_mlx.finetune.batches import DEPTH_DECODER_RATIO
from csm_mlx.finetune.data import MAX_CLIP_SECONDS, DataError, prepare, read_lines
from csm_mlx.finetune.trainer import Report, train
from csm_mlx.options import RULES as OPTION_RULES
from csm_mlx.options import OptionError, Rule, check_mapping, syntax_error

from .args import CliError, Parser, add_model_arguments

EXAMPLES = """examples:
  csm-mlx finetune --data my_voice/ --adapter-path my_voice_adapter --iters 600
  csm-mlx finetune -c finetune.yaml
  csm-mlx "Now in my voice." --adapter-path my_voice_adapter -o out.wav
  csm-mlx-convert --hf-path sesame/csm-1b --adapter-path my_voice_adapter --mlx-path my-voice-csm

DIR/train.jsonl (and optionally DIR/valid.jsonl) has one clip per line,
  {"audio": "clips/0001.wav", "text": "what it says", "speaker": 0}
or one conversation per line, {"segments": [clip, clip, ...]}, where a clip with "train": false
is context only. Clips are Mimi-encoded once and cached in DIR/.csm-mlx-cache. A config file
(-c) holds the same options in YAML (names with underscores, lora_parameters, lr_schedule);
flags given on the command line win. Ctrl-C saves the adapters trained so far. --dtype auto
trains on bfloat16 weights on a GPU (a 16 GB Mac fits the default recipe) and float32 on a CPU.
"""

DEFAULTS = {
    "model": hub.DEFAULT_MODEL,
    "dtype": "auto",
    "adapter_path": "adapters",
    "fine_tune_type": "lora",
    "num_layers": 16,
    "iters": 1000,
    "batch_size": 4,
    "learning_rate": None,  # by fine-tune type, below
    "depth_decoder_ratio": DEPTH_DECODER_RATIO,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "val_batches": 25,
    "save_every": 100,
    "seed": 0,
    "max_clip_seconds": MAX_CLIP_SECONDS,
    "lora_parameters": LORA_PARAMETERS,
    "lr_schedule": None,
}
STEPS = Rule(int, 1, 10**9)
# mlx-lm's lr_schedule: {name, arguments, warmup, warmup_init}, for mlx.optimizers' schedules
SCHEDULE_FIELDS = {
    "name": Rule(str, choices=("cosine_decay", "exponential_decay", "linear_schedule", "step_decay"), required=True),
    "arguments": Rule(list, items=Rule(float), required=True),
    "warmup": Rule(int, 0, 10**9),
    "warmup_init": Rule(float, 0.0),
}
# One rule per option, for a flag and for a key of the config file alike.
RULES = {
    **{name: Rule(str) for name in ("model", "tokenizer", "mimi", "data", "adapter_path", "resume_adapter_file")},
    "dtype": Rule(str, choices=("auto", *DTYPES)),
    "fine_tune_type": Rule(str, choices=FINE_TUNE_TYPES),
    "num_layers": NUM_LAYERS,
    "iters": STEPS,
    "batch_size": Rule(int, 1, 4096),
    "learning_rate": Rule(float, 0.0, 1.0, positive=True),
    "depth_decoder_ratio": Rule(float, 0.0, 1.0, positive=True),
    "grad_checkpoint": Rule(bool),
    "grad_accumulation_steps": STEPS,
    "steps_per_report": STEPS,
    "steps_per_eval": STEPS,
    "val_batches": Rule(int, -1, 10**9),
    "save_every": STEPS,
    "seed": replace(OPTION_RULES["seed"], optional=False),
    "max_clip_seconds": Rule(float, 0.0, 3600.0, positive=True),
    "lora_parameters": Rule(dict, fields=LORA_FIELDS),
    "lora_rank": LORA_FIELDS["rank"],
    "lora_scale": LORA_FIELDS["scale"],
    "lr_schedule": Rule(dict, optional=True, fields=SCHEDULE_FIELDS),
}
# The recipes that worked for CSM: LoRA at 2e-4 (Unsloth), full fine-tuning at 3e-5 (sesame-finetune).
LEARNING_RATES = {"lora": 2e-4, "full": 3e-5}
CONFIG_ONLY = ("lora_parameters", "lr_schedule")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="csm-mlx finetune", description="Fine-tune CSM on your clips (LoRA or full) with the "
               "reference's objective; writes DIR/adapters.safetensors and DIR/adapter_config.json for "
               "--adapter-path.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", metavar="FILE", help="YAML file of options (flags given here win)")
    p.add_argument("--data", metavar="DIR", help="directory with train.jsonl and optionally valid.jsonl")
    p.add_argument("--adapter-path", metavar="DIR", help="where the adapters go (default: adapters)")
    p.add_argument("--fine-tune-type", choices=FINE_TUNE_TYPES, help="lora (default) or full")
    p.add_argument("--num-layers", type=int, metavar="N",
                   help="backbone layers to train, the last N (default: 16, all; -1: all); the depth decoder is always trained")
    p.add_argument("--lora-rank", type=int, metavar="R", help=f"LoRA rank (default: {LORA_PARAMETERS['rank']})")
    p.add_argument("--lora-scale", type=float, metavar="S",
                   help=f"LoRA scale, alpha / rank (default: {LORA_PARAMETERS['scale']})")
    p.add_argument("--iters", type=int, metavar="N", help="training steps (default: 1000)")
    p.add_argument("--batch-size", type=int, metavar="N", help="sequences per step (default: 4)")
    p.add_argument("--learning-rate", type=float, metavar="LR",
                   help=f"Adam learning rate (default: {LEARNING_RATES['lora']} for lora, {LEARNING_RATES['full']} for full)")
    p.add_argument("--depth-decoder-ratio", type=float, metavar="R",
                   help="share of the audio frames the depth decoder trains on (default: 1/16; end-of-audio frames always)")
    p.add_argument("--grad-checkpoint", action="store_true", default=None,
                   help="keep only each block's input and recompute the rest in the backward pass: less memory, "
                        "about one more forward pass of time")
    p.add_argument("--grad-accumulation-steps", type=int, metavar="N", help="steps per optimizer update (default: 1)")
    p.add_argument("--steps-per-report", type=int, metavar="N", help="steps between loss reports (default: 10)")
    p.add_argument("--steps-per-eval", type=int, metavar="N", help="steps between validations (default: 200)")
    p.add_argument("--val-batches", type=int, metavar="N", help="validation batches, -1 for all (default: 25)")
    p.add_argument("--save-every", type=int, metavar="N", help="save the adapters every N steps (default: 100)")
    p.add_argument("--resume-adapter-file", metavar="FILE", help="start from these adapter weights")
    p.add_argument("--seed", type=int, metavar="N", help="seed for LoRA init, batch order and frames (default: 0)")
    p.add_argument("--max-clip-seconds", type=float, metavar="S",
                   help=f"cut longer clips at pauses between sentences (default: {MAX_CLIP_SECONDS:g})")
    add_model_arguments(p, training=True)
    p.set_defaults(model=None, dtype=None)
    return p


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, reading 1e-4 as a number as YAML 1.2 does (1.1 wants 1.0e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
               r"|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def read_config(path: str) -> dict:
    """The YAML config file's options, each checked by its rule."""
    where = f"config file {path}"
    if not Path(path).is_file():
        raise CliError(f"{where} {'is not a regular file' if Path(path).exists() else 'does not exist'}: "
                       "give a YAML file of options")
    try:
        config = yaml.load(Path(path).read_text(), Loader=_Loader)
    except UnicodeDecodeError:
        raise CliError(f"{where} is not UTF-8 text: convert it, e.g. with iconv -t UTF-8") from None
    except yaml.YAMLError as e:
        raise CliError(f"{where} is not valid YAML ({syntax_error(e)})") from None
    try:
        return check_mapping({} if config is None else config, RULES, where)
    except OptionError as e:
        raise CliError(str(e)) from None


def options(args) -> dict:
    """Flags given, else the config file's values, else the defaults; every value checked."""
    config = read_config(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    for name, value in given.items():
        try:
            RULES[name].check(name, value)
        except OptionError as e:
            raise CliError(f"--{name.replace('_', '-')} {e.problem}") from None
    opts = {**DEFAULTS, **config, **given}
    lora = {**LORA_PARAMETERS, **opts["lora_parameters"]}
    for key in ("rank", "scale"):
        if opts.get(f"lora_{key}") is not None:
            lora[key] = opts.pop(f"lora_{key}")
    opts["lora_parameters"] = lora
    if opts["learning_rate"] is None:
        opts["learning_rate"] = LEARNING_RATES[opts["fine_tune_type"]]
    check(opts)
    return opts


def check(o: dict) -> None:
    """What no single value's rule can say."""
    if not o.get("data"):
        raise CliError("no training data: give --data DIR (a directory with train.jsonl)")
    if o["val_batches"] == 0:
        raise CliError("--val-batches must be -1 (all) or at least 1, got 0")
    if o["lr_schedule"]:
        try:
            schedule = getattr(optim.schedulers, o["lr_schedule"]["name"])
            inspect.signature(schedule).bind(*o["lr_schedule"]["arguments"])
        except TypeError as e:
            raise CliError(f"lr_schedule: the arguments {o['lr_schedule']['arguments']} do not fit "
                           f"{o['lr_schedule']['name']} ({e}): give them in the order mlx.optimizers takes them") from None


def use_bfloat16_on_gpu(model, dtype: str) -> None:
    """--dtype auto trains an unquantized model in bfloat16 on a GPU: its float32 weights alone
    would take 6.2 of a 16 GB Mac's ~11 GB of GPU memory. (On a CPU auto is float32: bfloat16 has
    no fast CPU kernels.) LoRA weights and the optimizer state are float32 either way."""
    quantized = any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters()))
    if dtype == "auto" and mx.default_device().type != mx.cpu and not quantized:
        model.set_dtype(mx.bfloat16)


def data_files(data: Path) -> List[Optional[Path]]:
    """[train.jsonl, valid.jsonl or None], their lines checked (not yet their audio)."""
    if not (data / "train.jsonl").is_file():
        raise DataError(f"{data} has no train.jsonl: put one clip per line there (see csm-mlx finetune -h)")
    files = [data / "train.jsonl", data / "valid.jsonl" if (data / "valid.jsonl").is_file() else None]
    for path in files:
        if path is not None:
            read_lines(path)
    return files


def read_data(csm: CSM, files: List[Optional[Path]], window: int, max_clip_seconds: float):
    """(train, valid or None) examples, Mimi-encoded with a progress line per file."""
    sets = []
    for path in files:
        if path is None:
            sets.append(None)
            continue

        def progress(done, total, name=path.name):
            if sys.stderr.isatty():
                print(f"\rpreparing {name}: {done}/{total} lines", end="" if done < total else "\n", file=sys.stderr)

        sets.append(prepare(path, csm.mimi, csm.tokenizer, window, max_clip_seconds, progress))
    return sets[0], sets[1]


def print_report(r: Report) -> None:
    terms = f"{r.loss:.3f} (backbone {r.backbone_loss:.3f}, depth decoder {r.depth_decoder_loss:.3f})"
    if r.validation:
        print(f"step {r.iteration}: validation loss {terms}", file=sys.stderr)
    else:
        print(f"step {r.iteration}: loss {terms}, {r.tokens_per_second:.0f} tokens/s, learning rate "
              f"{r.learning_rate:.2e}, peak memory {r.peak_memory / 1e9:.2f} GB", file=sys.stderr)


def run(args) -> None:
    o = options(args)
    adapter_dir = Path(o["adapter_path"])
    if adapter_dir.exists() and not adapter_dir.is_dir():
        raise CliError(f"--adapter-path {adapter_dir} is a file: give a directory for the adapters")
    if (adapter_dir / ADAPTER_FILE).exists() and not o.get("resume_adapter_file"):
        raise CliError(f"{adapter_dir} already holds {ADAPTER_FILE}: choose another --adapter-path, or continue "
                       f"training it with --resume-adapter-file {adapter_dir / ADAPTER_FILE}")
    files = data_files(Path(o["data"]))
    # training makes no audio: the watermark's weights are not needed (nor downloaded)
    csm = CSM.load(o["model"], tokenizer=o.get("tokenizer"), mimi=o.get("mimi"), dtype=o["dtype"], watermark=False)
    use_bfloat16_on_gpu(csm.model, o["dtype"])
    model = csm.model
    window = model.args.backbone.max_seq_len
    train_set, valid_set = read_data(csm, files, window, o["max_clip_seconds"])
    for path, examples in zip(files, (train_set, valid_set)):
        if examples is not None and len(examples) < o["batch_size"]:
            raise DataError(f"{path} gives {len(examples)} sequences, fewer than --batch-size {o['batch_size']}: "
                            "add clips or lower the batch size")

    mx.random.seed(o["seed"])
    prepare_model(model, o["fine_tune_type"], o["num_layers"], o["lora_parameters"])
    if o.get("resume_adapter_file"):
        load_weights(model, o["resume_adapter_file"])
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"training {trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters ({o['fine_tune_type']}) on "
          f"{len(train_set)} sequences", file=sys.stderr)

    record = {k: o[k] for k in ("data", "iters", "batch_size", "learning_rate", "depth_decoder_ratio", "seed")}
    made = [p for p in (adapter_dir / CONFIG_FILE, adapter_dir) if not p.exists()]
    save_config(adapter_dir, adapter_config(model, o["fine_tune_type"], o["num_layers"], o["lora_parameters"],
                                            base_model=o["model"], **record))
    lr = build_schedule(o["lr_schedule"]) if o["lr_schedule"] else o["learning_rate"]
    training = TrainingArgs(batch_size=o["batch_size"], iters=o["iters"], val_batches=o["val_batches"],
                            steps_per_report=o["steps_per_report"], steps_per_eval=o["steps_per_eval"],
                            steps_per_save=o["save_every"], max_seq_length=window,
                            adapter_file=str(adapter_dir / ADAPTER_FILE), grad_checkpoint=o["grad_checkpoint"],
                            grad_accumulation_steps=o["grad_accumulation_steps"])
    saved = {}
    try:
        steps = train(model, optim.Adam(learning_rate=lr), train_set, valid_set, training, o["depth_decoder_ratio"],
                      o["seed"], on_report=print_report, on_save=lambda path, it: saved.update(path=path, it=it))
    except KeyboardInterrupt:
        if saved:
            print(f"csm-mlx: interrupted after step {saved['it']}: saved the adapters so far to {saved['path']}",
                  file=sys.stderr)
        raise
    except Exception:
        if not saved:  # a run that saved nothing leaves nothing behind: not even the config it made
            for path in made:
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink(missing_ok=True)
        raise
    print(f"wrote {adapter_dir / ADAPTER_FILE} after {steps} steps", file=sys.stderr)
