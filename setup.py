"""Builds csm_mlx._cpu_kernels, the CPU kernels for exact batching (csm_mlx/cpu_kernels.cpp), on Linux.

Everything else about the package is in pyproject.toml. The kernel is an MLX primitive compiled
against the MLX of the build environment; csm_mlx.blas loads it only when the MLX it runs with is
that same version, and otherwise (or when it did not build: the extension is optional) uses MKL.
Macs run the model on the GPU and build nothing.
"""

import sys
from importlib.metadata import version
from pathlib import Path

from setuptools import Extension, setup


def cpu_kernels_extension():
    if not sys.platform.startswith("linux"):
        return []
    import mlx
    import nanobind

    mlx_dir = Path(mlx.__path__[0])
    nb_dir = Path(nanobind.__file__).parent
    return [Extension(
        "csm_mlx._cpu_kernels",
        sources=["csm_mlx/cpu_kernels.cpp", str(nb_dir / "src" / "nb_combined.cpp")],
        depends=["csm_mlx/cpu_kernels_lanes.inc"],
        include_dirs=[str(mlx_dir / "include"), str(nb_dir / "include"), str(nb_dir / "ext" / "robin_map" / "include")],
        library_dirs=[str(mlx_dir / "lib")],
        runtime_library_dirs=["$ORIGIN/../mlx/lib"],  # an installed package; editable ones find the libmlx mlx.core loaded
        libraries=["mlx"],
        define_macros=[("NDEBUG", "1"), ("NB_DOMAIN", "mlx"),  # share the types of mlx.core, which binds in this domain
                       ("CSM_MLX_BUILT_WITH", f'"{version("mlx")}"')],
        extra_compile_args=["-std=c++20", "-O3", "-fvisibility=hidden", "-fno-strict-aliasing", "-Wno-psabi"],
        language="c++",
        optional=True,
    )]


setup(ext_modules=cpu_kernels_extension())
