"""The frame core: prompt rows, the per-row sampler, the stopping rules, rows that join and leave."""

from functools import partial

import mlx.core as mx
import numpy as np
import pytest

from csm_mlx import load_model
from csm_mlx.context import ContextError
from csm_mlx.frame_batch import FrameBatch
from csm_mlx.options import OptionError
from csm_mlx.prompt import TokenizedSegment, prompt_rows
from csm_mlx.sampling import Filters, Sampling, row_params, sample_codes
from csm_mlx.static_batch import speak_all
from csm_mlx.utterance import Chunk, Utterance, random_key

from csm_fixtures import generate_codes
from tie_check import assert_same_frames


@pytest.fixture(scope="module")
def model(original_dir):
    return load_model(original_dir)[0]


def utterance(text_tokens, context=(), max_frames=10, seed=0, **sampling):
    return Utterance(list(context), [Chunk(list(text_tokens), max_frames)], Sampling(**sampling), random_key(seed))


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


def silenced(model):
    """The model with its heads' weights zeroed: every logit equal, greedy picks code 0 in every
    codebook (the end-of-speech frame). Returns a function that restores them."""
    heads = [model.codebook0_head, *model.audio_head]
    weights = [h.weight for h in heads]
    for h in heads:
        h.weight = h.weight * 0
    model.__dict__.pop("_compiled_frames", None)  # traced over the old weights

    def restore():
        for h, w in zip(heads, weights):
            h.weight = w
        model.__dict__.pop("_compiled_frames", None)

    return restore


def test_all_zero_frame_ends_speech_and_is_not_emitted(model, text_tokens):
    restore = silenced(model)
    try:
        assert generate_codes(model, text_tokens, max_frames=20, temperature=0).shape == (32, 0)
    finally:
        restore()


def test_frame_cap(model, text_tokens):
    assert generate_codes(model, text_tokens, max_frames=5, temperature=0).shape == (32, 5)


def test_same_seed_same_codes_and_parameters_reach_the_sampler(model, text_tokens):
    a = generate_codes(model, text_tokens, max_frames=4, temperature=0.9, top_k=50, seed=7)
    b = generate_codes(model, text_tokens, max_frames=4, temperature=0.9, top_k=50, seed=7)
    np.testing.assert_array_equal(a, b)
    for params in ({"temperature": 0.9, "top_k": 50, "seed": 8}, {"temperature": 1.5, "top_k": 50, "seed": 7},
                   {"temperature": 0.9, "top_k": 5, "seed": 7}, {"temperature": 0.9, "top_k": 50, "top_p": 0.05, "seed": 7},
                   {"temperature": 0.9, "top_k": 0, "min_p": 0.2, "seed": 7}):
        assert not np.array_equal(a, generate_codes(model, text_tokens, max_frames=4, **params)), params


def test_top_k_1_is_greedy(model, text_tokens):
    np.testing.assert_array_equal(
        generate_codes(model, text_tokens, max_frames=4, temperature=0.9, top_k=1, seed=3),
        generate_codes(model, text_tokens, max_frames=4, temperature=0),
    )


def sample(logits, samplings, keys):
    codes, _ = sample_codes(Filters.of(samplings), row_params(samplings), logits, keys)
    return np.array(codes)


def test_codes_mimi_cannot_decode_are_never_sampled():
    logits = mx.full((4, 2051), -10.0)
    logits[:, 2048:] = 50.0  # the model prefers the three non-audio ids
    logits[:, 17] = 0.0
    keys = mx.stack([random_key(n) for n in range(4)])
    assert sample(logits, [Sampling(temperature=0)] * 4, keys).tolist() == [17] * 4
    wide = mx.broadcast_to(logits[:1], (256, 2051))
    assert sample(wide, [Sampling(temperature=1.0, top_k=0)] * 256, mx.stack([random_key(n) for n in range(256)])).max() < 2048


def test_a_row_draws_the_same_codes_alone_and_beside_others():
    """Each row has its own settings and key: what it draws does not depend on its neighbours."""
    logits = mx.random.normal((5, 2051), key=mx.random.key(1)) * 3
    samplings = [Sampling(0.9, 50), Sampling(0), Sampling(1.2, 0, 0.8), Sampling(0.7, 0, 0, 0.1), Sampling(1.0, 20, 0.9, 0.05)]
    keys = mx.stack([random_key(n) for n in range(5)])
    together = sample(logits, samplings, keys)
    alone = [sample(logits[i : i + 1], samplings[i : i + 1], keys[i : i + 1])[0] for i in range(5)]
    assert together.tolist() == alone
    assert together[1] == int(np.argmax(np.array(logits[1, :2048])))


def test_a_chunk_that_cannot_fit_the_window_is_refused_before_any_work(tokenizer_path):
    from csm_mlx.tokenizer import TextTokenizer
    from csm_mlx.utterance import make_utterance

    tokenizer = TextTokenizer(tokenizer_path)
    voice = TokenizedSegment([1, 2], np.zeros((32, 2040), np.int32), pinned=True)
    with pytest.raises(ContextError, match="more than the model's 2048-row window"):
        make_utterance(tokenizer, None, "Hello there.", 0, [voice], window=2048)
    with pytest.raises(OptionError, match="temperature"):
        make_utterance(tokenizer, None, "Hello there.", temperature=-1, window=2048)


def test_compiled_frame_gives_the_plain_frame(model):
    from csm_mlx.frame_batch import _frame, frame_step

    h = mx.random.normal((2, model.args.backbone.hidden_size), key=mx.random.key(0))
    samplings = [Sampling(0.9, 50), Sampling(0)]
    args = (h, row_params(samplings), mx.stack([random_key(3), random_key(4)]))
    plain = _frame(model, Filters.of(samplings), model.args.audio_num_codebooks, *args)
    filters = Filters.of(samplings)
    first, then = frame_step(model, filters, 2), frame_step(model, filters, 2)
    assert type(first) is partial and frame_step(model, filters, 2) is then  # a new batch size: plain, then compiled
    np.testing.assert_array_equal(np.array(first(*args)[0]), np.array(plain[0]))
    compiled = then(*args)
    np.testing.assert_array_equal(np.array(plain[0]), np.array(compiled[0]))
    np.testing.assert_array_equal(np.array(plain[1]), np.array(compiled[1]))


def test_a_static_batch_gives_each_row_its_solo_frames(model):
    rng = np.random.default_rng(21)
    vocab = model.args.text_vocab_size
    items = [
        (rng.integers(0, vocab, 5).tolist(), [], dict(temperature=0)),
        (rng.integers(0, vocab, 17).tolist(), [TokenizedSegment(rng.integers(0, vocab, 4).tolist(), rng.integers(0, 2048, (32, 6)))],
         dict(temperature=0.9, top_k=40, seed=5)),
        (rng.integers(0, vocab, 9).tolist(), [], dict(temperature=1.0, top_p=0.9, min_p=0.05, seed=6)),
        (rng.integers(0, vocab, 600).tolist(), [], dict(temperature=0)),  # longer than one prefill pass
    ]
    utterances = [utterance(text, context, 10, **options) for text, context, options in items]
    batched = dict(speak_all(model, utterances, len(items)))
    for n, (text, context, options) in enumerate(items):
        assert batched[n].shape == (32, 10)
        assert_same_frames(model, prompt_rows(context, text), options, batched[n],
                           generate_codes(model, text, context, max_frames=10, **options))


def test_rows_end_at_their_own_end_and_others_join_the_free_row(model, text_tokens):
    """Three utterances with different caps through a batch of two rows: the third joins when the
    first leaves, and each gets its solo frames."""
    caps = [3, 12, 4]
    texts = [text_tokens[: 4 + n] for n in range(3)]
    utterances = [utterance(text, (), cap, temperature=0) for text, cap in zip(texts, caps)]
    done = list(speak_all(model, utterances, 2))
    assert [n for n, _ in done] == [0, 2, 1]
    for n, codes in done:
        assert codes.shape == (32, caps[n])
        assert_same_frames(model, prompt_rows([], texts[n]), dict(temperature=0), codes,
                           generate_codes(model, texts[n], max_frames=caps[n], temperature=0))


def test_prefill_in_passes_gives_the_single_pass_frames(model):
    text = np.random.default_rng(5).integers(0, model.args.text_vocab_size, 700).tolist()
    rows = prompt_rows([], text)
    results = []
    for prefill_rows in (512, 10_000):
        batch = FrameBatch(model, prefill_rows=prefill_rows)
        row = batch.insert(utterance(text, (), 6, temperature=0))
        results.append(np.stack([f for r, f in batch.drain() if f is not None], axis=1))
        assert row.utterance.prefilled_rows == [700]
    assert_same_frames(model, rows, dict(temperature=0), results[0], results[1])


def test_a_removed_row_keeps_what_it_spoke(model, text_tokens):
    batch = FrameBatch(model)
    u = utterance(text_tokens, (), 20, temperature=0)
    u.keep_cache = True
    row = batch.insert(u)
    frames = []
    for r, frame in batch.drain():
        frames.append(frame)
        if len(frames) == 3:
            batch.remove(row)
    assert row.done and len(frames) == 3 and not batch.busy
    np.testing.assert_array_equal(u.history[-1].audio_codes, np.stack(frames, axis=1))
    held = row.kept.rows[0]
    assert row.kept.layers[0].offset == len(held) >= len(text_tokens) + 3


def test_a_difference_that_is_not_a_tie_is_caught(model, text_tokens):
    rows = prompt_rows([], text_tokens)
    for options in (dict(temperature=0), dict(temperature=0.9, top_k=50, seed=4)):
        codes = generate_codes(model, text_tokens, max_frames=4, **options)
        assert_same_frames(model, rows, options, codes, codes.copy())
        wrong = codes.copy()
        wrong[5, 2] = (wrong[5, 2] + 1) % 2048
        with pytest.raises(AssertionError, match="frame 2, codebook 5: codes"):
            assert_same_frames(model, rows, options, codes, wrong)
