"""The speech server under concurrent streaming clients, on random weights of the true sizes.

    python benchmarks/serve_bench.py --size tiny --clients 1 2 4 8 --seconds 4
    python benchmarks/serve_bench.py --size csm-1b --clients 1 2 4 8 --seconds 2

Starts `csm-mlx serve`'s app (uvicorn, 127.0.0.1) in this process over a random model, uploads a
2 s voice clip, then for each client count N runs N openai clients at once, each streaming its own
text as PCM (seeded sampling, a fixed frame cap). Per row: aggregate audio seconds generated per
wall second and its ratio to one client; per-request real-time factor (wall / audio); time to first
audio p50 / p95 (request sent -> first audio bytes); and, separately, the longest gap between two
chunks of a running stream while a second request is admitted (prefilled between its frames),
beside its median gap. Also: time to first audio of CSM.stream (what `csm-mlx --play` reports) on
the same prompt, and peak memory (MLX's peak and the process's max RSS).
"""

import argparse
import io
import json
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import csm_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import openai
import soundfile as sf
import uvicorn

from csm_mlx import CSM, Segment
from csm_mlx.codec import Mimi
from csm_mlx.models import Model
from csm_mlx.server import build_app
from csm_mlx.server.memory import limit_malloc_arenas
from csm_mlx.tokenizer import TextTokenizer

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from bench import SIZES  # noqa: E402
from speech_fixtures import make_mimi, make_tokenizer, write_voice  # noqa: E402

TEXTS = ["Hello there, how are you today?", "The quick brown fox jumps over the lazy dog.",
         "Numbers like three and four.", "Conversational speech needs context.", "Quotes like this one.",
         "Good morning to you.", "This is the seventh client.", "And the eighth one speaks last."]
VOICE_TEXT = "Hello from MLX. How are you today?"


def build_csm(size: str, workdir: Path) -> CSM:
    model = Model(SIZES[size]())
    mx.eval(model.parameters())
    tokenizer = TextTokenizer(make_tokenizer(workdir / "tokenizer.json"))
    return CSM(model, tokenizer, Mimi(make_mimi(workdir / "mimi.safetensors")))


class Server:
    def __init__(self, csm: CSM, voices_dir: Path, max_batch: int, prefill_chunk: int):
        self.engine = csm.engine(max_batch, max_queue=64, prefill_chunk=prefill_chunk)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(build_app(csm, self.engine, voices_dir), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join()
        self.engine.close()


def stream(client, voice, text, seconds, seed, out: dict):
    """One streaming request; out gets the send time and each chunk's arrival time and size."""
    out["sent"] = time.perf_counter()
    out["chunks"] = []
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice=voice, input=text, response_format="pcm",
            extra_body={"temperature": 0.9, "top_k": 50, "seed": seed, "max_audio_length_ms": seconds * 1000}) as r:
        for chunk in r.iter_bytes():
            out["chunks"].append((time.perf_counter(), len(chunk)))


def run_clients(client, voice, n: int, seconds: float):
    results = [{} for _ in range(n)]
    threads = [threading.Thread(target=stream, args=(client, voice, TEXTS[i % len(TEXTS)], seconds, i, results[i]))
               for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    audio = [sum(size for _, size in r["chunks"]) / 2 / 24_000 for r in results]
    first = [r["chunks"][0][0] - r["sent"] for r in results]
    rtf = [(r["chunks"][-1][0] - r["sent"]) / a for r, a in zip(results, audio)]
    return {"clients": n, "audio_s": sum(audio), "wall_s": wall, "audio_s_per_s": sum(audio) / wall,
            "max_rss_gb": max_rss_gb(),
            "rtf_mean": statistics.mean(rtf), "rtf_max": max(rtf),
            "ttfa_p50": statistics.median(first), "ttfa_p95": float(np.percentile(first, 95))}


def admission_gap(client, voice, seconds: float):
    """Client A streams; once it is running, B is sent. A's longest inter-chunk gap from B's send
    to B's first audio, beside A's median gap."""
    a, b = {}, {}
    ta = threading.Thread(target=stream, args=(client, voice, TEXTS[0], seconds * 2, 1, a))
    ta.start()
    while len(a.get("chunks", ())) < 3:
        time.sleep(0.001)
    tb = threading.Thread(target=stream, args=(client, voice, TEXTS[1], seconds, 2, b))
    tb.start()
    tb.join()
    ta.join()
    times = [t for t, _ in a["chunks"]]
    gaps = np.diff(times)
    window = [g for (t0, t1), g in zip(zip(times, times[1:]), gaps) if t1 >= b["sent"] and t0 <= b["chunks"][0][0]]
    return {"gap_max_admitting": max(window), "gap_median": float(np.median(gaps)),
            "admitted_after": b["chunks"][0][0] - b["sent"]}


def engine_alone(csm: CSM, voice: Segment, clients, seconds: float):
    """The same N requests submitted straight to an engine: no HTTP, no Mimi decoding, no encoders.
    What batching alone gives, to set beside what the server gets on the same machine."""
    context = [csm.tokenize(voice)]
    rows = []
    with csm.engine(max(clients), max_queue=64) as engine:
        engine.generate(TEXTS[0], 0, context, max_audio_length_ms=320)  # warm-up
        for n in clients:
            start = time.perf_counter()
            requests = [engine.submit(TEXTS[i % len(TEXTS)], 0, context, temperature=0.9, seed=i,
                                      max_audio_length_ms=seconds * 1000) for i in range(n)]
            frames = sum(r.codes().shape[1] for r in requests)
            rows.append({"clients": n, "audio_s_per_s": frames * 0.08 / (time.perf_counter() - start)})
    return rows


def play_first_audio(csm: CSM, clip: np.ndarray, seconds: float) -> float:
    """Time to the first chunk of CSM.stream: what `csm-mlx --play` reports as first audio
    (the second of two runs, as the server's is timed after a warm-up)."""
    for _ in range(2):
        start = time.perf_counter()
        chunks = csm.stream(TEXTS[0], 0, [Segment(0, VOICE_TEXT, clip, pinned=True)], temperature=0.9, seed=1,
                            max_audio_length_ms=seconds * 1000)
        next(chunks)
        first = time.perf_counter() - start
        chunks.close()
    return first


def max_rss_gb() -> float:
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per client (default: 4)")
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    limit_malloc_arenas()  # as csm-mlx serve does, before any thread starts

    workdir = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    csm = build_csm(args.size, workdir)
    clip_path = write_voice(workdir / "voice.wav", seconds=2.0)
    clip, _ = sf.read(clip_path, dtype="float32")
    server = Server(csm, workdir / "voices", max(args.clients), args.prefill_chunk)
    client = openai.OpenAI(base_url=server.url, api_key="bench", max_retries=0, timeout=3600)
    try:
        with open(clip_path, "rb") as f:
            voice = client.post("/audio/voices", cast_to=object,
                                files={"audio_sample": ("voice.wav", io.BytesIO(f.read()), "audio/wav")},
                                body={"name": "bench", "transcript": VOICE_TEXT},
                                options={"headers": {"Content-Type": "multipart/form-data"}})["id"]
        run_clients(client, voice, 1, min(args.seconds, 1.0))  # warm-up: compiles the one-row step
        rows = [run_clients(client, voice, n, args.seconds) for n in args.clients]
        gap = admission_gap(client, voice, args.seconds)
    finally:
        server.stop()
    play = play_first_audio(csm, clip, args.seconds)
    alone = engine_alone(csm, Segment(0, VOICE_TEXT, clip, pinned=True), args.clients, args.seconds)
    base = next((r["audio_s_per_s"] for r in rows if r["clients"] == 1), None)
    print(f"--max-batch {max(args.clients)}: {max(args.clients)} Mimi instances; peak RSS is the process's so far")
    print("| clients | audio s | wall s | audio s/s | x 1 client | RTF mean / max | first audio p50 / p95 (s) "
          "| peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['audio_s_per_s'] / base:.2f}" if base else "-"
        print(f"| {r['clients']} | {r['audio_s']:.1f} | {r['wall_s']:.1f} | {r['audio_s_per_s']:.3f} | {ratio} | "
              f"{r['rtf_mean']:.2f} / {r['rtf_max']:.2f} | {r['ttfa_p50']:.2f} / {r['ttfa_p95']:.2f} "
              f"| {r['max_rss_gb']:.2f} |")
    one = alone[0]["audio_s_per_s"] if alone[0]["clients"] == 1 else None
    print("\nthe engine alone (no HTTP, no Mimi): " + ", ".join(
        f"{r['clients']} requests {r['audio_s_per_s']:.3f} audio s/s" + (f" ({r['audio_s_per_s'] / one:.2f}x)" if one else "")
        for r in alone))
    print(f"admitting a second request: longest gap of the running stream {gap['gap_max_admitting']:.2f} s "
          f"(median gap {gap['gap_median']:.2f} s); the new one's first audio after {gap['admitted_after']:.2f} s")
    print(f"CSM.stream first audio (csm-mlx --play) on the same prompt: {play:.2f} s")
    peak = {"mlx_peak_gb": mx.get_peak_memory() / 1e9, "max_rss_gb": max_rss_gb()}
    print(f"peak memory: MLX {peak['mlx_peak_gb']:.2f} GB, process max RSS {peak['max_rss_gb']:.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "seconds": args.seconds, "rows": rows,
                                               "admission": gap, "play_first_audio_s": play,
                                               "engine_alone": alone, **peak}, indent=1))


if __name__ == "__main__":
    main()
