"""CPU kernels (csm_mlx/cpu_kernels.cpp): products and attention give MLX's numbers up to the order
of the sums, and a row the same bits in any batch, any pass and beside any padding."""

import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from csm_mlx import blas, load_model
from csm_mlx.blas import FEW_ROWS, exact_linear, exact_sdpa, use_cpu_kernels, use_training_products
from csm_mlx.models import Model, ModelArgs, TransformerArgs


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 48), (4, 1, 48), (3, 5, 48), (1, FEW_ROWS, 48), (1, FEW_ROWS + 1, 48)])
def test_exact_linear_equals_linear(shape, bias):
    plain = nn.Linear(48, 80, bias=bias)
    few = exact_linear()(48, 80, bias=bias)
    few.update(plain.parameters())
    x = mx.random.normal(shape, key=mx.random.key(len(shape) + shape[-2]))
    expected = np.array(plain(x))
    got = np.array(few(x))
    assert got.shape == expected.shape == (*shape[:-1], 80)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_load_model_uses_the_kernels_on_the_cpu_and_training_undoes_it(original_dir):
    model, _ = load_model(original_dir)
    layers = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    attentions = [layer.self_attn for layer in model.backbone.layers + model.decoder.layers]
    on_cpu = mx.default_device().type == mx.cpu
    swapped = (blas.FAST_BLAS is not None or blas.cpu_kernels() is not None) and on_cpu
    assert layers and all((type(m) is not nn.Linear) == swapped for m in layers)
    assert all((a.sdpa is exact_sdpa) == (blas.cpu_kernels() is not None and on_cpu) for a in attentions)
    use_training_products(model)
    assert all(type(m) is nn.Linear for _, m in model.named_modules() if isinstance(m, nn.Linear))
    assert all(a.sdpa is mx.fast.scaled_dot_product_attention for a in attentions)
    quantized = Model(ModelArgs(TransformerArgs(1, 64, 2, 1, 128), TransformerArgs(1, 64, 2, 1, 128), text_vocab_size=64))
    nn.quantize(quantized, group_size=32, bits=8)
    use_cpu_kernels(quantized)
    assert not any(type(m).__name__ == "ExactLinear" for _, m in quantized.named_modules())


kernels = blas.cpu_kernels()
kernel = kernels.exact_matmul if kernels is not None else None
needs_kernel = pytest.mark.skipif(kernels is None, reason="the CPU kernels are built on Linux only")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 70])
@pytest.mark.parametrize("k", [5, 64, 1000, 2100])  # a tail past the last 8 columns; more than one packed block
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
    assert np.array_equal(np.array(kernel(mx.concatenate([x, x[:3]]), w))[8:], batch[:3])  # 11 rows: packed


@needs_kernel
@pytest.mark.parametrize("k", [7, 520, 1030])
def test_kernel_gives_a_prompt_the_same_bits_in_any_passes(k):
    """A prompt's rows in one pass of 70, in passes of 8 or 13, or beside other prompts' rows."""
    w = mx.random.normal((101, k), key=mx.random.key(8))  # 101: partial packed blocks and tiles
    x = mx.random.normal((70, k), key=mx.random.key(9))
    whole = np.array(kernel(x, w))
    for size in (8, 13, 1):
        assert np.array_equal(np.concatenate([np.array(kernel(x[i : i + size], w)) for i in range(0, 70, size)]), whole)
    beside = mx.concatenate([mx.random.normal((5, k), key=mx.random.key(10)), x[20:40]])
    assert np.array_equal(np.array(kernel(beside, w))[5:], whole[20:40])


def _attention_inputs(B=3, Hq=4, Hkv=2, L=5, S=37, D=64, seed=0):
    keys = mx.random.split(mx.random.key(seed), 3)
    return (mx.random.normal((B, Hq, L, D), key=keys[0]), mx.random.normal((B, Hkv, S, D), key=keys[1]),
            mx.random.normal((B, Hkv, S, D), key=keys[2]))


@needs_kernel
@pytest.mark.parametrize("D", [64, 12])  # 12: a tail past the last 8 dims
def test_exact_attention_matches_mlx(D):
    q, k, v = _attention_inputs(D=D)
    masks = ["causal", None, mx.random.uniform(shape=(3, 1, 5, 37), key=mx.random.key(1)) > 0.3,
             mx.random.uniform(shape=(5, 37), key=mx.random.key(2)) > 0.3]
    for mask in masks:
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
        np.testing.assert_allclose(np.array(exact_sdpa(q, k, v, scale=0.3, mask=mask)), np.array(expected),
                                   rtol=1e-5, atol=1e-5)
    sliced = mx.random.normal((3, 2, 64, D))[:, :, :37]  # a cache's keys: a slice of a longer buffer
    np.testing.assert_allclose(np.array(exact_sdpa(q, sliced, v, scale=0.3)),
                               np.array(mx.fast.scaled_dot_product_attention(q, sliced, v, scale=0.3)),
                               rtol=1e-5, atol=1e-5)


@needs_kernel
def test_exact_attention_over_more_queries_than_the_pool_takes_tasks():
    q, k, v = _attention_inputs(B=1, Hq=64, Hkv=1, L=1030, S=1030, D=8)  # 65920 queries: two per task
    np.testing.assert_allclose(np.array(exact_sdpa(q, k, v, scale=0.3, mask="causal")),
                               np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask="causal")),
                               rtol=1e-5, atol=1e-5)


@needs_kernel
def test_exact_attention_ignores_padding_and_passes():
    """A row's output is the same bits left-padded in a batch (a frame step) and for a prompt in
    one causal pass or in chunks after its cache."""
    q, k, v = _attention_inputs(B=1, L=1, S=30)
    alone = np.array(exact_sdpa(q, k, v, scale=0.125))
    pad = 11
    kp = mx.concatenate([mx.random.normal((1, 2, pad, 64)), k], axis=2)
    vp = mx.concatenate([mx.random.normal((1, 2, pad, 64)), v], axis=2)
    mask = (mx.arange(pad + 30) >= pad)[None, None, None]
    assert np.array_equal(np.array(exact_sdpa(q, kp, vp, scale=0.125, mask=mask)), alone)
    q, k, v = _attention_inputs(B=1, L=30, S=30)
    whole = np.array(exact_sdpa(q, k, v, scale=0.125, mask="causal"))
    parts = [np.array(exact_sdpa(q[:, :, i : i + 7], k[:, :, : i + 7], v[:, :, : i + 7], scale=0.125, mask="causal"))
             for i in range(0, 30, 7)]
    assert np.array_equal(np.concatenate(parts, axis=2), whole)


@needs_kernel
def test_exact_attention_refuses_what_it_cannot_compute():
    q, k, v = _attention_inputs()
    with pytest.raises(ValueError, match="multiple of Hkv"):
        kernels.exact_attention(q, mx.repeat(k[:, :1], 3, axis=1), mx.repeat(v[:, :1], 3, axis=1), scale=1.0)
    with pytest.raises(ValueError, match="bool mask"):
        kernels.exact_attention(q, k, v, scale=1.0, mask=mx.ones((2, 5, 37), mx.bool_))


@needs_kernel
def test_exact_attention_has_mx_fasts_gradients():
    q, k, v = _attention_inputs()
    mask = mx.random.uniform(shape=(3, 1, 5, 37), key=mx.random.key(3)) > 0.3
    for m in ("causal", mask):
        def loss(f):
            return lambda a, b, c: (f(a, b, c, scale=0.3, mask=m) ** 2).sum()
        got = mx.grad(loss(exact_sdpa), argnums=(0, 1, 2))(q, k, v)
        expected = mx.grad(loss(mx.fast.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(np.array(g), np.array(e), rtol=1e-4, atol=1e-4)


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
def test_eight_lanes_where_avx512_would_give_sixteen():
    """CSM_MLX_KERNEL_LANES=8 sums in 8 lanes, as CPUs without AVX-512 do: correct and the same
    bits in any passes there too (the other tests run the widest this CPU has)."""
    script = textwrap.dedent("""
        import numpy as np, mlx.core as mx
        from csm_mlx.blas import cpu_kernels
        kernels = cpu_kernels()
        assert kernels.lanes() == 8
        w = mx.random.normal((101, 1030), key=mx.random.key(1))
        x = mx.random.normal((70, 1030), key=mx.random.key(2))
        whole = np.array(kernels.exact_matmul(x, w))
        exact = np.array(x).astype(np.float64) @ np.array(w).T.astype(np.float64)
        assert np.abs(whole - exact).max() < 1e-3
        for size in (1, 8, 13):
            parts = [np.array(kernels.exact_matmul(x[i : i + size], w)) for i in range(0, 70, size)]
            assert np.array_equal(np.concatenate(parts), whole)
    """)
    subprocess.run([sys.executable, "-c", script], env={**os.environ, "CSM_MLX_KERNEL_LANES": "8"}, check=True)


@needs_kernel
def test_kernel_takes_no_rows():
    assert np.array(kernel(mx.zeros((0, 16)), mx.ones((5, 16)))).shape == (0, 5)


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
