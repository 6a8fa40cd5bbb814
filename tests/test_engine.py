"""The continuous-batching engine: requests that share steps get the frames they get alone."""

import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from csm_mlx import CSM, TokenizedSegment
from csm_mlx.context import ContextError
from csm_mlx.engine import EngineFull
from csm_mlx.options import OptionError

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


def solo(csm, text, speaker, context, options):
    return csm.generate(text, speaker, context, **options).codes


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
        np.testing.assert_array_equal(engine.generate(text, speaker, context, **options),
                                      solo(csm, text, speaker, context, options))


def test_concurrent_requests_each_get_their_solo_frames(csm, engine):
    """Submitted together (and one joining later, mid-stream, with a long prompt prefilled in
    chunks between steps), every request gets exactly the frames it gets alone."""
    items = requests(csm)
    expected = [solo(csm, *item) for item in items]
    submitted = [engine.submit(text, speaker, context, **options) for text, speaker, context, options in items[:3]]
    first = submitted[0].get()
    late = engine.submit(*items[3][:3], **items[3][3])
    got = [np.concatenate([first[:, None], submitted[0].codes()], axis=1)] + [r.codes() for r in submitted[1:]] + [late.codes()]
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert engine.active == 0 and engine.waiting == 0


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
    held = [engine.submit("Hold a row.", 0, temperature=0, max_audio_length_ms=2000) for _ in range(6)]
    with pytest.raises(EngineFull, match="try again"):
        engine.submit("One too many.", 0)
    for request in held:
        request.cancel()
    for request in held:
        request.codes()
    assert engine.active == 0 and engine.waiting == 0


def test_requests_from_many_threads(csm, engine):
    texts = ["One.", "Two two.", "Three three three."]
    expected = {t: solo(csm, t, 0, [], GREEDY) for t in texts}
    got = {}

    def client(text):
        got[text] = engine.generate(text, 0, **GREEDY)

    threads = [threading.Thread(target=client, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for text in texts:
        np.testing.assert_array_equal(got[text], expected[text])
