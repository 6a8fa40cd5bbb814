"""Few-row products: the kernel (csm_mlx/few_rows.cpp) and the transposed MKL product give
nn.Linear's numbers."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from csm_mlx import blas, load_model
from csm_mlx.blas import FEW_ROWS, few_row_linear, use_few_row_products
from csm_mlx.models import Model, ModelArgs, TransformerArgs


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 48), (4, 1, 48), (3, 5, 48), (1, FEW_ROWS, 48), (1, FEW_ROWS + 1, 48)])
def test_few_row_linear_equals_linear(shape, bias):
    plain = nn.Linear(48, 80, bias=bias)
    few = few_row_linear()(48, 80, bias=bias)
    few.update(plain.parameters())
    x = mx.random.normal(shape, key=mx.random.key(len(shape) + shape[-2]))
    expected = np.array(plain(x))
    got = np.array(few(x))
    assert got.shape == expected.shape == (*shape[:-1], 80)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_load_model_swaps_plain_linears_only_on_the_cpu_with_the_kernel_or_mkl(original_dir):
    model, _ = load_model(original_dir)
    layers = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    swapped = (blas.FAST_BLAS is not None or blas.few_row_kernel() is not None) and mx.default_device().type == mx.cpu
    assert layers and all((type(m) is not nn.Linear) == swapped for m in layers)
    quantized = Model(ModelArgs(TransformerArgs(1, 64, 2, 1, 128), TransformerArgs(1, 64, 2, 1, 128), text_vocab_size=64))
    nn.quantize(quantized, group_size=32, bits=8)
    use_few_row_products(quantized)
    assert not any(type(m).__name__ == "FewRowLinear" for _, m in quantized.named_modules())


kernel = blas.few_row_kernel()
needs_kernel = pytest.mark.skipif(kernel is None, reason="the few-row kernel is built on Linux only")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("k", [64, 1000])  # 1000: a tail past the last 8 columns
def test_kernel_matches_a_float64_product(rows, k):
    x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
    w = np.random.default_rng(k).standard_normal((75, k)).astype(np.float32)  # 75: a partial block and step
    got = np.array(kernel(mx.array(x), mx.array(w)))
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_kernel_gives_a_row_the_same_bits_in_any_batch():
    w = mx.random.normal((300, 512), key=mx.random.key(1))
    x = mx.random.normal((8, 512), key=mx.random.key(2))
    batch = np.array(kernel(x, w))
    for i in range(8):
        assert np.array_equal(np.array(kernel(x[i : i + 1], w))[0], batch[i])
    assert np.array_equal(np.array(kernel(x[2:6], w)), batch[2:6])
    assert np.array_equal(np.array(kernel(mx.concatenate([x, x[:3]]), w))[8:], batch[:3])  # 11 rows: two passes


@needs_kernel
def test_kernel_gradients_and_compile_equal_matmuls():
    w = mx.random.normal((96, 64), key=mx.random.key(3))
    x = mx.random.normal((3, 64), key=mx.random.key(4))
    loss = lambda f: lambda a, b: (f(a, b) ** 2).sum()  # noqa: E731
    got = mx.grad(loss(kernel), argnums=(0, 1))(x, w)
    expected = mx.grad(loss(lambda a, b: a @ b.T), argnums=(0, 1))(x, w)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.array(g), np.array(e), rtol=1e-4, atol=1e-4)
    compiled = mx.compile(lambda a, b: kernel(a, b) * 2)
    assert np.array_equal(np.array(compiled(x, w)), 2 * np.array(kernel(x, w)))
    transposed = mx.random.normal((64, 3), key=mx.random.key(5)).T  # not row-contiguous
    np.testing.assert_allclose(np.array(kernel(transposed, w)), np.array(transposed @ w.T), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="float32"):
        kernel(mx.zeros((2, 8), mx.float16), mx.zeros((4, 8), mx.float16))
    with pytest.raises(ValueError, match=r"x \(M, K\) and w \(N, K\)"):
        kernel(mx.zeros((2, 8)), mx.zeros((4, 9)))


@needs_kernel
def test_kernel_runs_beside_another_threads_cpu_stream():
    """Two threads, each on its own CPU stream, share the kernel's threads one product at a time."""
    import threading

    w = mx.random.normal((4096, 256), key=mx.random.key(6))
    x = mx.random.normal((4, 256), key=mx.random.key(7))
    expected = np.array(kernel(x, w))
    mx.eval(w, x)
    results = []

    def work():
        with mx.stream(mx.new_thread_local_stream(mx.cpu)):
            results.append(all(np.array_equal(np.array(kernel(x, w)), expected) for _ in range(50)))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True, True]
