"""Cost of the watermark: embedding per second of audio and its share of a csm-1b frame, and
`verify` on a 10 s clip with and without the phase search, beside SilentCipher's own torch code.

    python benchmarks/watermark.py                  # random weights of the true sizes (nothing downloaded)
    python benchmarks/watermark.py --weights DIR    # the real 44_1_khz/73999_iteration: also checks the mark

Rows: csm-mlx's Watermarker.watermark (24 kHz in: resampling to 44.1 kHz and back included) and
SilentCipher's encode_wav (44.1 kHz in) per second of audio; the share of a csm-1b frame (80 ms of
audio, --frame-seconds per frame as benchmarked in README.md) that embedding those 80 ms costs;
a stream's first region (what its first chunk waits for) and a whole stream marked 80 ms at a time. verify: one decoder pass
(search "none"; SilentCipher: decode_wav without phase_shift_decoding), the fast search when
nothing stops it early (its worst case; passes counted), and the reference's 205-pass search
(timed over --reference-offsets offsets and scaled to 205 unless --full). With --weights, the
weights are the real ones and the script also says whether the mark is found (by csm-mlx and
by SilentCipher), on --audio if given (else a synthetic clip).
"""

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import csm_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)
import numpy as np
import soxr
import torch

from csm_mlx.audio import read_audio
from csm_mlx.watermark import HOP, PHASE_OFFSETS, PUBLIC_KEY, REACH, SAMPLE_RATE, Watermarker

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from watermark_fixtures import reference_model, write_silentcipher  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def speechlike(seconds: float, rate: int) -> np.ndarray:
    """Harmonics of a gliding 120-220 Hz pitch under a 4 Hz syllable envelope, with pauses, plus noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(170 + 50 * np.sin(2 * np.pi * 0.3 * t)) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30))
    envelope = np.clip(np.sin(2 * np.pi * 2 * t), 0, None) * (np.sin(2 * np.pi * 0.23 * t) > -0.7)
    return (0.1 * voiced * envelope + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="directory of the real weights (default: random ones of the true sizes)")
    parser.add_argument("--audio", help="with --weights: a speech file to mark and check (default: synthetic)")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (default: 10)")
    parser.add_argument("--frame-seconds", type=float, default=0.871,
                        help="csm-1b seconds per frame on this machine (default: 0.871, float32, README.md)")
    parser.add_argument("--reference-offsets", type=int, default=5,
                        help="offsets the reference's phase search is timed over (default: 5)")
    parser.add_argument("--full", action="store_true", help="run all 205 offsets of both exhaustive searches")
    args = parser.parse_args()
    torch.set_num_threads(2)

    weights = Path(args.weights) if args.weights else write_silentcipher(Path(tempfile.mkdtemp()) / "silentcipher")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference_model(weights)
    wm = Watermarker.load(weights)
    audio_24k = read_audio(args.audio) if args.audio else speechlike(args.seconds, 24_000)
    seconds = len(audio_24k) / 24_000
    audio_44k = soxr.resample(audio_24k, 24_000, SAMPLE_RATE, quality="HQ")
    print(f"{'real' if args.weights else 'random'} weights, {seconds:.1f} s clip, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)\n")

    print("| embedding | s per audio second | share of a csm-1b frame |")
    print("|---|---|---|")
    wm.watermark(audio_24k[:24_000], PUBLIC_KEY)  # warm-up
    mlx_time, marked_24k = timed(lambda: wm.watermark(audio_24k, PUBLIC_KEY))
    with torch.no_grad():
        ref_time, ref_marked = timed(lambda: ref.encode_wav(audio_44k, SAMPLE_RATE, list(PUBLIC_KEY), calc_sdr=False,
                                                            message_sdr=36)[0])
    for name, t in (("csm-mlx (24 kHz in and out)", mlx_time), ("SilentCipher encode_wav (torch, 44.1 kHz)", ref_time)):
        print(f"| {name} | {t / seconds:.3f} | {t / seconds * 0.08 / args.frame_seconds:.1%} |")
    first = audio_44k[: HOP + REACH]
    first_time, _ = timed(lambda: wm.encode(first, PUBLIC_KEY))
    print(f"| a stream's first region (46 ms, in a {(HOP + REACH) / SAMPLE_RATE:.2f} s window) | {first_time:.3f} s | |")

    def streamed():
        marker = wm.stream(PUBLIC_KEY)
        pieces = [marker.feed(audio_24k[i : i + 1920]) for i in range(0, len(audio_24k), 1920)]
        return np.concatenate(pieces + [marker.flush()])
    stream_time, stream_marked = timed(streamed)
    print(f"| a stream, 80 ms at a time | {stream_time / seconds:.3f} | {stream_time / seconds * 0.08 / args.frame_seconds:.1%} |")
    ours = wm.encode(audio_44k, PUBLIC_KEY)
    round_trip = soxr.resample(soxr.resample(audio_24k, 24_000, SAMPLE_RATE, quality="HQ"), SAMPLE_RATE, 24_000,
                               quality="HQ")[: len(audio_24k)]
    print(f"\nmax |csm-mlx encode - encode_wav| on this clip: {np.abs(ours - ref_marked).max():.1e}; "
          f"SNR of the mark (24 kHz, vs the resampling round trip) "
          f"{snr(soxr.resample(audio_44k, SAMPLE_RATE, 24_000, quality='HQ')[: len(audio_24k)], marked_24k):.1f} dB; "
          f"the streamed mark vs the whole clip's: {snr(marked_24k - round_trip, stream_marked - round_trip):.1f} dB "
          f"(the mark's own size over the difference)\n")

    passes = []
    logits = wm._logits
    wm._logits = lambda y: passes.append(len(y)) or logits(y)
    print("| verify | passes | s | s per audio second |")
    print("|---|---|---|---|")
    rows = []
    for search in ("none", "fast", "exhaustive"):
        if search == "exhaustive" and not args.full:
            continue
        passes.clear()
        t, result = timed(lambda: wm.verify(audio_44k, SAMPLE_RATE, search=search))
        rows.append((f"csm-mlx search={search}", len(passes), t, result))
        if search == "none":
            one_pass = t
    if not args.full:
        rows.append(("csm-mlx search=exhaustive (est.: 205 x one pass)", len(PHASE_OFFSETS), one_pass * 205, None))
    with torch.no_grad():
        t, result = timed(lambda: ref.decode_wav(audio_44k, SAMPLE_RATE, phase_shift_decoding=False))
        rows.append(("SilentCipher decode_wav, no phase search", 1, t, result))
        ref_pass = t
        if args.full:
            t, result = timed(lambda: ref.decode_wav(audio_44k, SAMPLE_RATE, phase_shift_decoding=True))
            rows.append(("SilentCipher decode_wav, phase search", len(PHASE_OFFSETS) + 1, t, result))
        else:
            hop = ref.config.HOP_LENGTH
            ref.config.HOP_LENGTH = 10 * args.reference_offsets  # its search scans range(0, HOP_LENGTH, 10)
            y = audio_44k * np.sqrt(ref.average_energy_VCTK / np.mean(audio_44k**2))
            t, _ = timed(lambda: ref.get_best_ps(y))
            ref.config.HOP_LENGTH = hop
            rows.append((f"SilentCipher decode_wav, phase search (est.: {args.reference_offsets} passes timed)",
                         len(PHASE_OFFSETS) + 1, t / args.reference_offsets * len(PHASE_OFFSETS) + ref_pass, None))
    for name, n, t, _ in rows:
        print(f"| {name} | {n} | {t:.1f} | {t / seconds:.2f} |")

    if args.weights:
        print("\nthe mark, with the real weights (key found / expected):")
        found, confidence = wm.verify(marked_24k, 24_000)
        print(f"  csm-mlx verify of csm-mlx's watermark(): {found} (confidence {confidence:.2f}) / {PUBLIC_KEY}")
        found, confidence = wm.verify(stream_marked, 24_000)
        print(f"  csm-mlx verify of a stream marked 80 ms at a time: {found} (confidence {confidence:.2f})")
        for name, _, _, result in rows:
            if result is not None:
                print(f"  {name}, on the unmarked clip: {result}")
        with torch.no_grad():  # encode() marks on the clip's own frame grid: offset 0
            check = ref.decode_wav(ours, SAMPLE_RATE, phase_shift_decoding=False)
        print(f"  SilentCipher decode_wav (offset 0) of csm-mlx's encode(): {check}")
        found, confidence = wm.verify(ref_marked, SAMPLE_RATE, search="none")
        print(f"  csm-mlx verify (offset 0) of SilentCipher's encode_wav(): {found} (confidence {confidence:.2f})")


def snr(signal, other):
    return 10 * np.log10(np.sum(signal.astype(np.float64) ** 2) / np.sum((signal - other).astype(np.float64) ** 2))


if __name__ == "__main__":
    main()
