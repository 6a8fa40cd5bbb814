"""The continuous-batching engine: requests that share steps get the frames they get alone."""

import contextlib
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from csm_mlx import CSM
from csm_mlx.context import ContextError
from csm_mlx.engine import EngineFull
from csm_mlx.options import OptionError
from csm_mlx.prompt import TokenizedSegment

from tie_check import assert_same_speech

FRAMES = 8
GREEDY = dict(temperature=0, max_audio_length_ms=FRAMES * 80)


@pytest.fixture(scope="module")
def csm(hub_cache):
    return CSM.load(watermark=False)  # codes only here: the watermark marks audio


@pytest.fixture(scope="module")
def engine(csm):
    with csm.engine(max_batch=4, max_queue=2, prefill_chunk=8) as engine:
        yield engine


def requests(csm):
    """Different texts, voices, speakers and settings: greedy, seeded with each filter, a text in two chunks."""
    voice_a, voice_b = csm.voice("conversational_a", 0), csm.voice("conversational_b", 1)
    return [
        ("Hello from the engine.", 0, [voice_a], dict(GREEDY)),
        ("A second, different line.", 1, [voice_b], dict(temperature=0.8, top_k=40, seed=3, max_audio_length_ms=560)),
        ("Short.", 0, [], dict(temperature=1.0, top_p=0.9, min_p=0.05, seed=11, max_audio_length_ms=480)),
        ("First part of it. Then the second part.", 1, [voice_a], dict(GREEDY, chunk_chars=20)),
    ]


@contextlib.contextmanager
def held(engine):
    """The engine thread waits between two frames: requests submitted meanwhile arrive together."""
    holding, release = threading.Event(), threading.Event()
    thread = threading.Thread(target=engine.call, args=(lambda: holding.set() or release.wait(),))
    thread.start()
    holding.wait()
    try:
        yield
    finally:
        release.set()
        thread.join()


def test_call_runs_on_the_engine_thread_between_frames(engine):
    """How a server's audio threads get MLX work done: on the engine's one thread, errors raised back."""
    running = engine.submit("Keep talking while others call.", 0, temperature=0, max_audio_length_ms=800)
    assert engine.call(lambda: threading.current_thread().name) == "csm-engine"
    assert engine.call(lambda: (mx.arange(4) * 2).tolist()) == [0, 2, 4, 6]
    with pytest.raises(ZeroDivisionError):
        engine.call(lambda: 1 / 0)
    assert running.codes().shape == (32, 10)  # the stream ran on around the calls


def test_alone_a_request_gets_what_csm_generate_gives(csm, engine):
    for text, speaker, context, options in requests(csm):
        assert_same_speech(csm, text, speaker, context, options, engine.generate(text, speaker, context, **options))


def test_concurrent_requests_each_get_their_solo_frames(csm, engine):
    """Submitted together (and one joining later, mid-stream, with a long prompt prefilled in
    chunks between steps), every request gets exactly the frames it gets alone."""
    items = requests(csm)
    submitted = [engine.submit(text, speaker, context, **options) for text, speaker, context, options in items[:3]]
    first = submitted[0].get()
    late = engine.submit(*items[3][:3], **items[3][3])
    got = [np.concatenate([first[:, None], submitted[0].codes()], axis=1)] + [r.codes() for r in submitted[1:]] + [late.codes()]
    for g, item in zip(got, items):
        assert_same_speech(csm, *item, g)
    assert engine.active == 0 and engine.waiting == 0


def test_get_returns_none_at_the_end(engine):
    request = engine.submit("Short.", 0, temperature=0, max_audio_length_ms=160)
    frames = [request.get(timeout=60), request.get(timeout=60)]
    assert [f.shape for f in frames] == [(32,), (32,)]
    assert request.get(timeout=60) is None and request.get() is None


def test_cancel_frees_the_row_within_a_frame(csm, engine):
    request = engine.submit("Cancel me soon.", 0, temperature=0, max_audio_length_ms=4000)
    request.get()
    steps = engine.steps
    request.cancel()
    deadline = time.time() + 10
    while engine.active and time.time() < deadline:
        time.sleep(0.005)
    assert engine.active == 0
    assert engine.steps - steps <= 1
    assert len(request.codes()) == 32 and request.frames < 50


def test_full_queue_and_bad_input_fail_at_submit(csm, engine):
    with pytest.raises(OptionError, match="top_p must be at most 1"):
        engine.submit("x", top_p=2)
    with pytest.raises(ContextError):
        engine.submit("x", 0, [TokenizedSegment([1, 2], np.zeros((32, 2040), np.int32), pinned=True)])
    busy = [engine.submit("Hold a row.", 0, temperature=0, max_audio_length_ms=2000) for _ in range(6)]
    with pytest.raises(EngineFull, match="try again"):
        engine.submit("One too many.", 0)
    for request in busy:
        request.cancel()
    for request in busy:
        request.codes()
    assert engine.active == 0 and engine.waiting == 0


def test_requests_from_many_threads(csm, engine):
    texts = ["One.", "Two two.", "Three three three."]
    got = {}

    def client(text):
        got[text] = engine.generate(text, 0, **GREEDY)

    threads = [threading.Thread(target=client, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for text in texts:
        assert_same_speech(csm, text, 0, [], GREEDY, got[text])


def test_requests_arriving_together_are_prefilled_together(csm, engine):
    """One backbone pass for all their prompts (different lengths, right-padded): they join the
    batch at the same step, so the batch takes as many steps as the longest request has frames."""
    voice_a, voice_b = csm.voice("conversational_a", 0), csm.voice("conversational_b", 1)
    items = [("Hello from the engine.", 0, [voice_a], GREEDY), ("A second, different line.", 1, [voice_b], GREEDY),
             ("Short.", 1, [], GREEDY)]
    steps = engine.steps
    with held(engine):
        submitted = [engine.submit(text, speaker, context, **options) for text, speaker, context, options in items]
    got = [request.codes() for request in submitted]
    for g, item in zip(got, items):
        assert_same_speech(csm, *item, g)
    assert engine.steps - steps == max(g.shape[1] for g in got)


def test_an_idle_engine_admits_requests_sent_together_at_once(csm):
    """Sent one after another with no hold (as a server's clients arrive, ms apart), they still
    join at the same step: the idle engine waits admit_wait for the rest before it prefills."""
    texts = ["One line.", "Another line here.", "A third."]
    with csm.engine(max_batch=4, admit_wait=0.5) as engine:
        submitted = [engine.submit(t, 0, **GREEDY) for t in texts]
        frames = [r.codes().shape[1] for r in submitted]
        assert engine.steps == max(frames)
    with pytest.raises(ValueError, match="admit_wait must be a number of seconds"):
        csm.engine(admit_wait=-1)


def test_a_context_is_prefilled_once_and_reused(csm):
    """Requests with the same voice run it through the backbone once, the first of them (those
    arriving beside it wait for it), and the rest only their own text, still getting the frames
    they get alone; a budget smaller than two contexts keeps the latest."""
    voice_a, voice_b = csm.voice("conversational_a", 0), csm.voice("conversational_b", 1)
    texts = ["The first one.", "Then another one."]
    context_rows, other_rows = csm.tokenize(voice_a).rows, csm.tokenize(voice_b).rows
    with csm.engine(max_batch=2, prefill_chunk=8, context_cache_rows=max(context_rows, other_rows)) as engine:
        with held(engine):
            first, second = [engine.submit(t, 0, [voice_a], **GREEDY) for t in texts]
        for request, text in zip((first, second), texts):
            assert_same_speech(csm, text, 0, [voice_a], GREEDY, request.codes())
        text_rows = [len(csm.tokenizer.encode(t, 0)) for t in texts]
        assert first.prefilled_rows == [context_rows + text_rows[0]]
        assert second.prefilled_rows == [text_rows[1]]
        other = engine.submit(texts[0], 1, [voice_b], **GREEDY)
        assert_same_speech(csm, texts[0], 1, [voice_b], GREEDY, other.codes())
        again = engine.submit(texts[1], 0, [voice_a], **GREEDY)
        assert_same_speech(csm, texts[1], 0, [voice_a], GREEDY, again.codes())
        assert again.prefilled_rows == [context_rows + text_rows[1]]  # voice_b's context took the budget
