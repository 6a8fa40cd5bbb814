"""Few-row products on MKL: the transposed product gives nn.Linear's numbers."""

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


def test_load_model_swaps_plain_linears_only_on_the_cpu_with_mkl(original_dir):
    model, _ = load_model(original_dir)
    layers = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    swapped = blas.FAST_BLAS is not None and mx.default_device().type == mx.cpu
    assert layers and all((type(m) is not nn.Linear) == swapped for m in layers)
    quantized = Model(ModelArgs(TransformerArgs(1, 64, 2, 1, 128), TransformerArgs(1, 64, 2, 1, 128), text_vocab_size=64))
    nn.quantize(quantized, group_size=32, bits=8)
    use_few_row_products(quantized)
    assert not any(type(m).__name__ == "FewRowLinear" for _, m in quantized.named_modules())
