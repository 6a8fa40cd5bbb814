"""Fast and exact products for MLX's CPU backend on Linux: MKL in place of the bundled BLAS, and
csm_mlx's kernels for the products and attention of inference.

MLX's Linux CPU wheel carries the reference (netlib) BLAS: ~5 GB/s for the matrix-vector
products that dominate a frame. Intel MKL (the `mkl` wheel, a default dependency on Linux
x86_64) reaches ~25-28 GB/s. Loading libmkl_rt with RTLD_GLOBAL before libmlx is loaded puts
MKL's cblas_* ahead of the bundled BLAS when the dynamic linker resolves libmlx's symbols.
Set CSM_MLX_BLAS=reference to keep the bundled BLAS. Apple and CUDA backends are unaffected.
"""

import ctypes
import functools
import glob
import os
import sys
from importlib.metadata import version
from typing import Optional


def load_fast_blas() -> Optional[str]:
    """Load MKL for MLX if possible; returns the library loaded, or None."""
    if not sys.platform.startswith("linux") or os.environ.get("CSM_MLX_BLAS") == "reference":
        return None
    if "mlx.core" in sys.modules:
        return None  # too late: libmlx has already bound its BLAS
    for path in sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*"))):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return path
    return None


FAST_BLAS = load_fast_blas()


# Without the kernels, products of this many rows (2 up to it) run transposed on MKL: see ExactLinear.
FEW_ROWS = 64


@functools.lru_cache(maxsize=None)
def cpu_kernels():
    """csm_mlx._cpu_kernels (exact_matmul, exact_attention) when it can run here, else None: it
    must have been built (Linux; setup.py) against the very MLX that is loaded, and the CPU must
    run it. Set CSM_MLX_KERNELS=off to leave products and attention to MKL and MLX."""
    if os.environ.get("CSM_MLX_KERNELS") == "off":
        return None
    import mlx.core  # noqa: F401  (loads libmlx, which the kernels link to)

    try:
        from . import _cpu_kernels
    except ImportError:
        return None
    if _cpu_kernels.MLX_VERSION != version("mlx") or not _cpu_kernels.supported():
        return None
    return _cpu_kernels


@functools.lru_cache(maxsize=None)
def exact_linear():
    """The Linear class for inference on the CPU (imported late: mlx must load after MKL)."""
    import mlx.core as mx
    import mlx.nn as nn

    kernels = cpu_kernels()

    class ExactLinear(nn.Linear):
        """nn.Linear whose every row gets the same numbers in any batch and any pass: a prompt
        prefilled in one pass or in chunks beside running streams, a frame's row alone or among
        eight. With csm_mlx's kernels (csm_mlx/cpu_kernels.cpp), in float32: 1 to 8 rows read
        the weights once for all rows at the memory's bandwidth; more rows (a prompt) run
        through each cached block of weights. Without them, on MKL, 2 to FEW_ROWS rows run as
        (W @ x.T).T: MKL's sgemm takes x @ W.T with a few rows at close to one matrix-vector
        product per row (4 rows cost ~3.7x one), and W @ x.T at ~1.6x with MKL's two threads;
        those are fast, not exact. Same parameters, same results up to the order of the sums."""

        def __call__(self, x):
            rows = x.size // x.shape[-1]
            flat = x.reshape(rows, x.shape[-1])
            if kernels is not None and x.dtype == self.weight.dtype == mx.float32:
                y = kernels.exact_matmul(flat, self.weight)
            elif FAST_BLAS is not None and 2 <= rows <= FEW_ROWS:
                # row-major again, so what follows sees the layout nn.Linear gives (and sums as it would)
                y = mx.contiguous((self.weight @ flat.T).T)
            else:
                return super().__call__(x)
            y = y.reshape(*x.shape[:-1], self.weight.shape[0])
            return y + self["bias"] if "bias" in self else y

    return ExactLinear


def exact_sdpa(q, k, v, *, scale, mask=None):
    """mx.fast.scaled_dot_product_attention's arguments and result; in float32 with the kernels,
    each query's softmax is summed over exactly the keys it sees, in key order, so padding and
    passes change nothing. Anything else goes to mx.fast."""
    import mlx.core as mx

    kernels = cpu_kernels()
    exact = kernels is not None and q.dtype == k.dtype == v.dtype == mx.float32
    if exact and mask is not None and not isinstance(mask, str):
        if mask.dtype != mx.bool_ or mask.ndim not in (2, 4) or (mask.ndim == 4 and mask.shape[1] != 1):
            exact = False
        else:
            mask = mask if mask.ndim == 2 else mask[:, 0]
            mask = mx.broadcast_to(mask, (mask.shape[0] if mask.ndim == 3 else 1, q.shape[2], k.shape[2]))
    if not exact or (isinstance(mask, str) and mask != "causal"):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if isinstance(mask, str):
        return kernels.exact_attention(q, k, v, scale=scale, causal=True)
    return kernels.exact_attention(q, k, v, scale=scale, mask=mask)


def use_cpu_kernels(model) -> None:
    """For inference on the CPU backend: make model's plain Linear layers ExactLinear (with the
    kernels or MKL; quantized and other layers are left as they are) and its attention the exact
    kernel (with the kernels). Elsewhere nothing changes."""
    import mlx.core as mx

    if mx.default_device().type != mx.cpu:
        return
    kernels = cpu_kernels()
    if kernels is not None or FAST_BLAS is not None:
        _swap_linears(model, nn_linear=True)
    if kernels is not None:
        for attention in _attentions(model):
            attention.sdpa = exact_sdpa


def use_training_products(model) -> bool:
    """Undo use_cpu_kernels for training: plain Linear layers and mx.fast attention (gradients
    are BLAS products either way, and BLAS computes a long sequence's forward faster); whether
    the model used the kernels."""
    attentions = _attentions(model)
    used = any(isinstance(m, exact_linear()) for m in model.modules()) or any("sdpa" in a.__dict__ for a in attentions)
    _swap_linears(model, nn_linear=False)
    for attention in attentions:
        attention.__dict__.pop("sdpa", None)
    return used


def _attentions(model):
    from .models.csm import Attention

    return [m for _, m in model.named_modules() if isinstance(m, Attention)]


def _swap_linears(model, nn_linear: bool) -> None:
    """Plain nn.Linear layers -> ExactLinear (nn_linear) or back."""
    import mlx.nn as nn
    from mlx.utils import tree_map

    source, target = (nn.Linear, exact_linear()) if nn_linear else (exact_linear(), nn.Linear)

    def swap(module):
        if type(module) is not source:
            return module
        linear = target(1, 1, bias="bias" in module)
        linear.update(module.parameters())
        frozen = [k for k in module.parameters() if k not in module.trainable_parameters()]
        if frozen:  # a LoRA layer's base, a layer full fine-tuning leaves out
            linear.freeze(keys=frozen)
        return linear

    model.update_modules(tree_map(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
