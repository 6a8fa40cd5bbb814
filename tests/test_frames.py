"""Prompt rows, sampling and the stopping rules of the frame loop."""

import mlx.core as mx
import numpy as np
import pytest

from csm_mlx import TokenizedSegment, generate, generate_frames, load_model, make_frame_sampler, prompt_rows
from csm_mlx.frames import frame_decoder, generate_batch, generate_batch_frames


@pytest.fixture(scope="module")
def model(original_dir):
    return load_model(original_dir)[0]


def test_prompt_rows_follow_the_reference_layout():
    codes = np.arange(32 * 3).reshape(32, 3) + 1
    tokens, mask = prompt_rows([TokenizedSegment([7, 8], codes), TokenizedSegment([9], None)], [4, 5, 6])
    # segment 1: 2 text rows, 3 audio rows, 1 EOS row; segment 2: 1 text row; then 3 text rows
    assert tokens.shape == mask.shape == (10, 33)
    assert tokens.dtype == np.int32 and mask.dtype == bool
    text_rows = [0, 1, 6, 7, 8, 9]
    np.testing.assert_array_equal(tokens[text_rows, 32], [7, 8, 9, 4, 5, 6])
    assert (tokens[text_rows, :32] == 0).all()
    assert mask[text_rows, 32].all() and not mask[text_rows, :32].any()
    np.testing.assert_array_equal(tokens[2:5, :32], codes.T)
    assert (tokens[5] == 0).all()  # the end-of-audio row
    assert mask[2:6, :32].all() and not mask[2:6, 32].any()


def counting_sampler(zero_from_frame):
    """Greedy, but every codebook of frame >= zero_from_frame samples code 0 (end of speech)."""
    greedy = make_frame_sampler(temperature=0)
    calls = []

    def sampler(logits):
        calls.append(None)
        frame = (len(calls) - 1) // 32
        return mx.zeros(logits.shape[:-1], mx.uint32) if frame >= zero_from_frame else greedy(logits)

    return sampler


def test_all_zero_frame_ends_speech_and_is_not_emitted(model, text_tokens):
    tokens, mask = prompt_rows([], text_tokens)
    # a sampler with Python-side state must run eagerly: compiled, it would only run while tracing
    frames = list(generate_frames(model, tokens, mask, counting_sampler(zero_from_frame=3), max_frames=20, compiled=False))
    assert len(frames) == 3
    assert all(f.any() for f in frames)
    greedy = generate(model, text_tokens, max_frames=3, temperature=0)
    np.testing.assert_array_equal(np.stack(frames, axis=1), greedy)


def test_frame_cap(model, text_tokens):
    assert generate(model, text_tokens, max_frames=5, temperature=0).shape == (32, 5)


def test_same_seed_same_codes_and_parameters_reach_the_sampler(model, text_tokens):
    a = generate(model, text_tokens, max_frames=4, temperature=0.9, top_k=50, seed=7)
    b = generate(model, text_tokens, max_frames=4, temperature=0.9, top_k=50, seed=7)
    np.testing.assert_array_equal(a, b)
    for params in ({"temperature": 0.9, "top_k": 50, "seed": 8}, {"temperature": 1.5, "top_k": 50, "seed": 7},
                   {"temperature": 0.9, "top_k": 5, "seed": 7}, {"temperature": 0.9, "top_k": 50, "top_p": 0.5, "seed": 7},
                   {"temperature": 0.9, "top_k": 0, "min_p": 0.2, "seed": 7}):
        assert not np.array_equal(a, generate(model, text_tokens, max_frames=4, **params)), params


def test_top_k_1_is_greedy(model, text_tokens):
    np.testing.assert_array_equal(
        generate(model, text_tokens, max_frames=4, temperature=0.9, top_k=1, seed=3),
        generate(model, text_tokens, max_frames=4, temperature=0),
    )


def test_codes_mimi_cannot_decode_are_never_sampled():
    logits = mx.full((4, 2051), -10.0)
    logits[:, 2048:] = 50.0  # the model prefers the three non-audio ids
    logits[:, 17] = 0.0
    assert np.array(make_frame_sampler(temperature=0)(logits)).tolist() == [17] * 4
    sampled = np.array(make_frame_sampler(temperature=1.0, top_k=0)(mx.broadcast_to(logits[:1], (256, 2051))))
    assert sampled.max() < 2048


def test_prompt_must_fit_the_window(model):
    long_text = [1] * 2000
    with pytest.raises(ValueError, match="exceeds the model's 2048-row window"):
        generate(model, long_text, max_frames=49)


def test_bad_sampling_parameters():
    with pytest.raises(ValueError, match="temperature"):
        make_frame_sampler(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        make_frame_sampler(top_p=1.5)


@pytest.mark.parametrize("temperature", [0, 0.9])
def test_compiled_loop_gives_the_plain_loop_frames(model, text_tokens, temperature):
    tokens, mask = prompt_rows([], text_tokens)
    runs = []
    for compiled in (False, True):
        mx.random.seed(11)
        sampler = make_frame_sampler(temperature=temperature, top_k=50)
        runs.append(np.stack(list(generate_frames(model, tokens, mask, sampler, 12, compiled=compiled))))
    assert runs[0].shape == (12, 32)
    np.testing.assert_array_equal(runs[0], runs[1])


def test_compiled_frame_logits_match_plain(model):
    h = mx.random.normal((1, model.args.backbone.hidden_size), key=mx.random.key(0))
    greedy = make_frame_sampler(temperature=0)
    plain_codes, plain_logits = frame_decoder(model, greedy, compiled=False, with_logits=True)(h)
    fast_codes, fast_logits = frame_decoder(model, greedy, compiled=True, with_logits=True)(h)
    np.testing.assert_array_equal(np.array(plain_codes), np.array(fast_codes))
    assert np.abs(np.array(plain_logits) - np.array(fast_logits)).max() <= 1e-5


def test_batch_gives_each_item_its_solo_frames(model):
    rng = np.random.default_rng(21)
    vocab = model.args.text_vocab_size
    items = [
        (rng.integers(0, vocab, 5).tolist(), []),
        (rng.integers(0, vocab, 17).tolist(), [TokenizedSegment(rng.integers(0, vocab, 4).tolist(), rng.integers(0, 2048, (32, 6)))]),
        (rng.integers(0, vocab, 9).tolist(), []),
        (rng.integers(0, vocab, 600).tolist(), []),  # longer than one prefill pass, the others padded
    ]
    batched = generate_batch(model, [prompt_rows(context, text) for text, context in items], max_frames=10, temperature=0)
    for (text, context), codes in zip(items, batched):
        np.testing.assert_array_equal(codes, generate(model, text, context, max_frames=10, temperature=0))
    assert all(c.shape == (32, 10) for c in batched)


def test_batch_items_end_at_their_own_end_of_speech(model, text_tokens):
    """Item 1 samples the all-zero frame at frame 2: it stops there; item 0 runs on."""
    greedy = make_frame_sampler(temperature=0)
    calls = []

    def sampler(logits):
        frame = len(calls) // 32
        calls.append(None)
        codes = greedy(logits)
        return mx.where(mx.array([False, frame >= 2]), 0, codes).astype(codes.dtype)

    prompt = prompt_rows([], text_tokens)
    steps = list(generate_batch_frames(model, [prompt, prompt], sampler, max_frames=6, compiled=False))
    assert len(steps) == 6
    assert [bool(active[1]) for _, active in steps] == [True, True, False, False, False, False]
    assert all(active[0] for _, active in steps)


def test_prefill_in_passes_gives_the_single_pass_frames(model, monkeypatch):
    import csm_mlx.frames as frame_loop

    text = np.random.default_rng(5).integers(0, model.args.text_vocab_size, 700).tolist()
    in_passes = generate(model, text, max_frames=6, temperature=0)
    monkeypatch.setattr(frame_loop, "PREFILL_ROWS", 10_000)
    np.testing.assert_array_equal(in_passes, generate(model, text, max_frames=6, temperature=0))
