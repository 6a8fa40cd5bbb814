"""Products x @ W.T on the CPU: MKL (MLX's matmul) against csm-mlx's exact kernel.

    python benchmarks/cpu_kernels.py

Prints ms per product for csm-1b's weight shapes at 1, 2, 4, 8 and 16 rows (a frame's batch) and
76 and 365 rows (prompts), each over 8 distinct weights so that none is served from the cache (as
in a frame or a prefill, where every weight is read once).
"""

import time

import csm_mlx  # noqa: F401  (loads MKL before mlx.core)
import mlx.core as mx

from csm_mlx.blas import cpu_kernels

SHAPES = [(8192, 2048), (2048, 8192), (8192, 1024), (1024, 1024), (2051, 1024)]


def timed(f, n=20):
    for _ in range(3):
        mx.eval(f())
    start = time.perf_counter()
    for _ in range(n):
        mx.eval(f())
    return (time.perf_counter() - start) / n * 1e3


def main():
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("cpu_kernels.py: the kernels are not built here (see README, Install)")
    kernel = kernels.exact_matmul
    print("| weight (N x K) | rows | MKL ms | kernel ms |\n|---|---|---|---|")
    for n, k in SHAPES:
        weights = [mx.random.normal((n, k)) for _ in range(8)]
        mx.eval(weights)
        for rows in (1, 2, 4, 8, 16, 76, 365):
            x = mx.random.normal((rows, k))
            n_runs = 20 if rows <= 16 else 3
            mkl = timed(lambda: [x @ w.T for w in weights], n_runs) / 8
            ours = timed(lambda: [kernel(x, w) for w in weights], n_runs) / 8
            print(f"| {n} x {k} | {rows} | {mkl:.2f} | {ours:.2f} |", flush=True)


if __name__ == "__main__":
    main()
