"""MKL for MLX's CPU backend on Linux x86_64; nothing anywhere else.

MLX's Linux CPU wheel carries the reference (netlib) BLAS: ~5 GB/s for the matrix-vector
products that dominate a frame. Intel MKL (the `mkl` wheel, a dependency on Linux x86_64)
reaches ~25-28 GB/s, 3-4x per frame. Loading libmkl_rt with RTLD_GLOBAL before libmlx is
loaded puts MKL's cblas_* ahead of the bundled BLAS when the dynamic linker resolves libmlx's
symbols. Set CSM_MLX_BLAS=reference to keep the bundled BLAS. Macs (Accelerate and Metal) and
CUDA are untouched: there this module does nothing.
"""

import ctypes
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
