"""The training loop: mlx-lm's tuner loop with CSM's two-term objective.

mlx_lm.tuner.trainer.train compiles its step, which needs a loss whose shapes follow from its
inputs' shapes; CSM's depth decoder runs on the frames the labels select, a number only the data
knows, and the loss has two terms worth watching. So the step here is not compiled and reports
both terms; everything else (TrainingArgs, gradient checkpointing, accumulation, numbered
checkpoints, evaluation every steps_per_eval) follows mlx-lm.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models import llama
from mlx_lm.tuner.trainer import TrainingArgs, grad_checkpoint

from ..models import Model
from .adapters import save_adapters
from .batches import DEPTH_DECODER_RATIO, iterate_batches
from .data import Example

Batch = Tuple[mx.array, mx.array, mx.array]


class TrainingError(ValueError):
    """Training that cannot go on; the message says why and what was kept."""


def csm_loss(model: Model, tokens: mx.array, mask: mx.array, labels: mx.array):
    """(loss, backbone loss, depth-decoder loss, rows): the objective and the non-padding rows."""
    loss, backbone, depth = model.training_loss(tokens, mask, labels)
    return loss, backbone, depth, mask.any(axis=-1).sum()


@dataclass
class Report:
    iteration: int
    loss: float
    backbone_loss: float
    depth_decoder_loss: float
    tokens_per_second: float = 0.0
    learning_rate: float = 0.0
    peak_memory: float = 0.0  # bytes
    validation: bool = False


def evaluate(model: Model, batches: Iterator[Batch], num_batches: int, loss: Callable = csm_loss) -> Tuple[float, float, float]:
    """Mean (loss, backbone loss, depth-decoder loss) over num_batches batches (-1: all),
    weighted by rows as mlx-lm weights by tokens."""
    totals, rows = mx.zeros(3), 0
    for n, batch in enumerate(batches):
        if n == num_batches:
            break
        *terms, count = loss(model, *batch)
        totals = totals + mx.stack(terms) * count
        rows += count.item()
    return tuple((totals / rows).tolist())


def train(
    model: Model,
    optimizer,
    train_set: List[Example],
    val_set: Optional[List[Example]] = None,
    args: TrainingArgs = TrainingArgs(),
    depth_decoder_ratio: float = DEPTH_DECODER_RATIO,
    seed: Optional[int] = None,
    loss: Callable = csm_loss,
    batches: Callable = iterate_batches,
    on_report: Optional[Callable[[Report], None]] = None,
    on_save: Optional[Callable[[Path, int], None]] = None,
) -> int:
    """Train the model's trainable parameters for args.iters steps; return the steps done.

    Adapters are saved to args.adapter_file every args.steps_per_save steps (with a numbered
    copy beside it), at the end, and when interrupted (Ctrl-C): then KeyboardInterrupt goes on
    up, after the save. A loss that is not finite stops training with a TrainingError: the step
    has already made the weights NaN, so nothing more is saved and the last save stays.
    batches(dataset, batch_size, depth_decoder_ratio, loop, seed) yields
    (tokens, mask, labels)."""
    adapter_file = Path(args.adapter_file)
    if args.grad_accumulation_steps < 1:
        raise ValueError("grad_accumulation_steps must be at least 1")
    restore = llama.TransformerBlock.__call__
    if args.grad_checkpoint:
        # mlx-lm's checkpointing patches the block class, shared by backbone and depth decoder.
        grad_checkpoint(model.backbone.layers[0])
    loss_and_grad = nn.value_and_grad(model, loss)
    step, accumulated, saved = 0, None, 0
    since_report = dict(terms=mx.zeros(3), steps=0, rows=0, time=0.0)

    def save(it: int, numbered: bool) -> None:
        nonlocal saved
        save_adapters(model, adapter_file)
        saved = it
        if numbered:
            save_adapters(model, adapter_file.parent / f"{it:07d}_{adapter_file.name}")
        if on_save is not None:
            on_save(adapter_file, it)

    def validate(it: int) -> None:
        model.eval()
        terms = evaluate(model, batches(val_set, args.batch_size, depth_decoder_ratio, False, 0),
                         args.val_batches, loss)
        model.train()
        if on_report is not None:
            on_report(Report(it, *terms, validation=True))

    model.train()
    train_batches = batches(train_set, args.batch_size, depth_decoder_ratio, True, seed)
    try:
        for it in range(1, args.iters + 1):
            if val_set and (it == 1 or it % args.steps_per_eval == 0 or it == args.iters):
                validate(it)
            tic = time.perf_counter()
            (total, backbone, depth, rows), grad = loss_and_grad(model, *next(train_batches))
            accumulated = grad if accumulated is None else tree_map(mx.add, accumulated, grad)
            if it % args.grad_accumulation_steps == 0:
                k = args.grad_accumulation_steps
                optimizer.update(model, tree_map(lambda g: g / k, accumulated) if k > 1 else accumulated)
                accumulated = None
            mx.eval(model.parameters(), optimizer.state, accumulated, total, backbone, depth)
            if not math.isfinite(total.item()):
                kept = f"the adapters of step {saved} stay in {adapter_file}" if saved else "no adapters were saved"
                raise TrainingError(f"the loss is {total.item()} at step {it}, so training stopped: lower the "
                                    f"learning rate (--learning-rate) or check the data; {kept}")
            step = it
            since_report["terms"] = since_report["terms"] + mx.stack([total, backbone, depth])
            since_report["steps"] += 1
            since_report["rows"] += rows.item()
            since_report["time"] += time.perf_counter() - tic
            if it % args.steps_per_report == 0 or it == args.iters:
                terms = (since_report["terms"] / since_report["steps"]).tolist()
                if on_report is not None:
                    on_report(Report(it, *terms, tokens_per_second=since_report["rows"] / since_report["time"],
                                     learning_rate=optimizer.learning_rate.item(), peak_memory=mx.get_peak_memory()))
                since_report = dict(terms=mx.zeros(3), steps=0, rows=0, time=0.0)
            if it % args.steps_per_save == 0:
                save(it, numbered=True)
    except KeyboardInterrupt:
        save(step, numbered=False)
        raise
    finally:
        llama.TransformerBlock.__call__ = restore
    save(step, numbered=False)
    return step
