"""Fast products for MLX's CPU backend on Linux: MKL in place of the bundled BLAS, and a kernel
for the few-row products of a frame.

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


# Products of this many rows (2 up to it) run transposed on MKL: see FewRowLinear.
FEW_ROWS = 64
# ... and up to this many on the kernel, in one pass over the weights (MAX_ROWS in few_rows.cpp).
KERNEL_ROWS = 8


@functools.lru_cache(maxsize=None)
def few_row_kernel():
    """csm_mlx._few_rows.few_row_matmul when it can run here, else None: it must have been built
    (Linux; setup.py) against the very MLX that is loaded, and the CPU must run it. Set
    CSM_MLX_FEW_ROWS=blas to leave few-row products to the BLAS."""
    if os.environ.get("CSM_MLX_FEW_ROWS") == "blas":
        return None
    import mlx.core  # noqa: F401  (loads libmlx, which the kernel links to)

    try:
        from . import _few_rows
    except ImportError:
        return None
    if _few_rows.MLX_VERSION != version("mlx") or not _few_rows.supported():
        return None
    return _few_rows.few_row_matmul


@functools.lru_cache(maxsize=None)
def few_row_linear():
    """The Linear class for few-row products on the CPU (imported late: mlx must load after MKL)."""
    import mlx.core as mx
    import mlx.nn as nn

    kernel = few_row_kernel()

    class FewRowLinear(nn.Linear):
        """nn.Linear for the products of a frame, 1 to 8 rows (one per stream of a batch).

        With csm_mlx's kernel (csm_mlx/few_rows.cpp) they read the weights once for all rows at
        the memory's bandwidth, and every row gets the same numbers whatever its batch. Else, on
        MKL, 2 to FEW_ROWS rows run as (W @ x.T).T: MKL's sgemm takes x @ W.T with a few rows at
        close to one matrix-vector product per row (4 rows cost ~3.7x one), and W @ x.T at
        ~1.6x with MKL's two threads. Same parameters, same results up to the order of the sums."""

        def __call__(self, x):
            rows = x.size // x.shape[-1]
            flat = x.reshape(rows, x.shape[-1])
            if kernel is not None and rows <= KERNEL_ROWS and x.dtype == self.weight.dtype == mx.float32:
                y = kernel(flat, self.weight)
            elif FAST_BLAS is not None and 2 <= rows <= FEW_ROWS:
                # row-major again, so what follows sees the layout nn.Linear gives (and sums as it would)
                y = mx.contiguous((self.weight @ flat.T).T)
            else:
                return super().__call__(x)
            y = y.reshape(*x.shape[:-1], self.weight.shape[0])
            return y + self["bias"] if "bias" in self else y

    return FewRowLinear


def use_few_row_products(model) -> None:
    """On the CPU backend with the few-row kernel or MKL, make model's plain Linear layers
    FewRowLinear (quantized and other layers are left as they are); elsewhere nothing changes."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map

    if mx.default_device().type != mx.cpu or (FAST_BLAS is None and few_row_kernel() is None):
        return
    cls = few_row_linear()

    def swap(module):
        if type(module) is not nn.Linear:
            return module
        linear = cls(1, 1, bias="bias" in module)
        linear.update(module.parameters())
        return linear

    model.update_modules(tree_map(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
