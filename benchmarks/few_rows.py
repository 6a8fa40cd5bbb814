"""Few-row products x @ W.T on the CPU: MKL (MLX's matmul) against csm-mlx's kernel.

    python benchmarks/few_rows.py

Prints ms per product for csm-1b's weight shapes at 1, 2, 4, 8 and 16 rows, each over 8 distinct
weights so that none is served from the cache (as in a frame, where every weight is read once).
"""

import time

import csm_mlx  # noqa: F401  (loads MKL before mlx.core)
import mlx.core as mx

from csm_mlx.blas import few_row_kernel

SHAPES = [(8192, 2048), (2048, 8192), (8192, 1024), (1024, 1024), (2051, 1024)]


def timed(f, n=20):
    for _ in range(3):
        mx.eval(f())
    start = time.perf_counter()
    for _ in range(n):
        mx.eval(f())
    return (time.perf_counter() - start) / n * 1e3


def main():
    kernel = few_row_kernel()
    if kernel is None:
        raise SystemExit("few_rows.py: the kernel is not built here (see README, Install)")
    print("| weight (N x K) | rows | MKL ms | kernel ms |\n|---|---|---|---|")
    for n, k in SHAPES:
        weights = [mx.random.normal((n, k)) for _ in range(8)]
        mx.eval(weights)
        for rows in (1, 2, 4, 8, 16):
            x = mx.random.normal((rows, k))
            mkl = timed(lambda: [x @ w.T for w in weights]) / 8
            ours = timed(lambda: [kernel(x, w) for w in weights]) / 8
            print(f"| {n} x {k} | {rows} | {mkl:.2f} | {ours:.2f} |", flush=True)


if __name__ == "__main__":
    main()
