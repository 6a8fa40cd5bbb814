"""A fast BLAS for MLX's CPU backend on Linux.

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


# Products of this many rows (2 up to it) run transposed: see FewRowLinear.
FEW_ROWS = 64


@functools.lru_cache(maxsize=None)
def few_row_linear():
    """The Linear class for few-row products on MKL (imported late: mlx must load after MKL)."""
    import mlx.core as mx
    import mlx.nn as nn

    class FewRowLinear(nn.Linear):
        """nn.Linear that computes a product of 2 to FEW_ROWS rows as (W @ x.T).T. MKL's sgemm
        takes x @ W.T with a few rows at close to one matrix-vector product per row (a batch of
        4 costs ~3.7x one row), and W @ x.T, a few columns, at ~1.6x: the weights are read
        once for all rows, which is what batching concurrent streams is for (with MKL's two
        threads; one thread gains nothing). Same parameters, same results up to the order of
        the sums."""

        def __call__(self, x):
            rows = x.size // x.shape[-1]
            if not 2 <= rows <= FEW_ROWS:
                return super().__call__(x)
            # row-major again, so what follows sees the layout nn.Linear gives (and sums as it would)
            y = mx.contiguous((self.weight @ x.reshape(rows, x.shape[-1]).T).T)
            y = y.reshape(*x.shape[:-1], self.weight.shape[0])
            return y + self["bias"] if "bias" in self else y

    return FewRowLinear


def use_few_row_products(model) -> None:
    """On the CPU backend with MKL loaded, make model's plain Linear layers FewRowLinear
    (quantized and other layers are left as they are); elsewhere nothing changes."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map

    if FAST_BLAS is None or mx.default_device().type != mx.cpu:
        return
    cls = few_row_linear()

    def swap(module):
        if type(module) is not nn.Linear:
            return module
        linear = cls(1, 1, bias="bias" in module)
        linear.update(module.parameters())
        return linear

    model.update_modules(tree_map(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
