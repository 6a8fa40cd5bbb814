"""The MLX model against transformers' CSM, teacher-forced, for both checkpoint formats."""

import mlx.core as mx
import numpy as np
import pytest

import csm_mlx.models.csm as csm_module
from csm_fixtures import (
    TINY_ARGS,
    generate_codes,
    original_spec,
    reference_greedy_frames,
    reference_prompt_embeds,
    reference_teacher_forced_logits,
)
from csm_mlx import load_model
from csm_mlx.convert import convert
from csm_mlx.models import ModelArgs
from csm_mlx.prompt import TokenizedSegment, prompt_rows

N_FRAMES = 24
TOLERANCE = 1e-4


def mlx_logits(model, context, text_tokens, frames):
    tokens, mask = prompt_rows(context, text_tokens)
    logits = model.teacher_forced_logits(mx.array(tokens)[None], mx.array(mask)[None], mx.array(frames)[None])
    return np.array(logits[0].astype(mx.float32))


@pytest.fixture(scope="module")
def greedy_frames(reference, text_tokens):
    return reference_greedy_frames(reference, text_tokens, N_FRAMES)


@pytest.fixture(scope="module")
def audio_context():
    rng = np.random.default_rng(2)
    return [
        TokenizedSegment(rng.integers(0, TINY_ARGS.text_vocab_size, 7).tolist(), rng.integers(0, 2048, (32, 9))),
        TokenizedSegment(rng.integers(0, TINY_ARGS.text_vocab_size, 5).tolist(), rng.integers(0, 2048, (32, 4))),
    ]


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory, original_dir):
    return convert(str(original_dir), tmp_path_factory.mktemp("mlx") / "model", dtype="float32")


@pytest.fixture(scope="module", params=["original", "transformers", "converted"])
def model(request, original_dir, transformers_dir, converted_dir):
    path = {"original": original_dir, "transformers": transformers_dir, "converted": converted_dir}[request.param]
    return load_model(path)[0]


def test_text_prompt_logits_match_transformers(model, reference, text_tokens, greedy_frames):
    expected = reference_teacher_forced_logits(reference, reference_prompt_embeds(reference, [], text_tokens), greedy_frames)
    got = mlx_logits(model, [], text_tokens, greedy_frames)
    assert got.shape == (N_FRAMES, 32, 2051)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_audio_context_logits_match_transformers(model, reference, text_tokens, audio_context):
    frames = np.random.default_rng(3).integers(0, 2048, (N_FRAMES, 32))
    segments = [(s.text_tokens, s.audio_codes) for s in audio_context]
    expected = reference_teacher_forced_logits(reference, reference_prompt_embeds(reference, segments, text_tokens), frames)
    got = mlx_logits(model, audio_context, text_tokens, frames)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_wrong_rope_convention_is_caught(monkeypatch, original_dir, reference, text_tokens, greedy_frames):
    """Loading the original format without the q/k permutation (a port shipped that bug)
    must be far outside the tolerance, or the tests above could not catch it."""
    monkeypatch.setattr(csm_module, "interleaved_to_rotate_half", lambda w, n_heads: w)
    wrong = load_model(original_dir)[0]
    expected = reference_teacher_forced_logits(reference, reference_prompt_embeds(reference, [], text_tokens), greedy_frames)
    assert np.abs(mlx_logits(wrong, [], text_tokens, greedy_frames) - expected).max() > 1.0


def test_greedy_generation_matches_transformers(model, text_tokens, greedy_frames):
    codes = generate_codes(model, text_tokens, max_frames=N_FRAMES, temperature=0)
    np.testing.assert_array_equal(codes.T, greedy_frames)


def test_original_key_layout_is_csm_1b(request):
    """The fixture's original-format names and shapes are those of the real csm-1b at full size."""
    rows = (request.path.parent / "data" / "csm-1b-keys.tsv").read_text().splitlines()
    real = {k: tuple(int(n) for n in s.strip("[]").split(", ")) for k, s, _ in (r.split("\t") for r in rows[1:])}
    assert original_spec(ModelArgs.from_flavors("llama-1B", "llama-100M")) == real


def test_bfloat16_logits_within_rounding_of_float32(transformers_dir, text_tokens, greedy_frames):
    """bfloat16 keeps 8 significant bits (unit roundoff u = 2^-8). Each of the tiny model's
    4 layers rounds about 4 times along the residual path (norm, attention, MLP, add), so
    the relative RMS error should stay within 16u = 6.25%; measured 2-4%. float16
    (u = 2^-11) must be ~8x better, which confirms the error is rounding, not a bug."""
    ref = mlx_logits(load_model(transformers_dir)[0], [], text_tokens, greedy_frames)

    def rel_rms(dtype):
        got = mlx_logits(load_model(transformers_dir, dtype=dtype)[0], [], text_tokens, greedy_frames)
        return np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2))

    bf16, fp16 = rel_rms("bfloat16"), rel_rms("float16")
    assert bf16 <= 16 * 2**-8
    assert 4 <= bf16 / fp16 <= 16
