"""`csm-mlx verify FILE...`: does each file carry the watermark (the reference's public key, or --key)?"""

import argparse
import sys

from csm_mlx.audio import AudioError, audio_info, read_audio_blocks
from csm_mlx.watermark import (LONG, PUBLIC_KEY, SAMPLE_RATE, SEARCHES, Watermarker, WatermarkError, check_verify_rate,
                               format_key)

from .args import Parser, watermark_key

EXAMPLES = """examples:
  csm-mlx verify hello.wav clips/*.wav
  csm-mlx verify reply.flac --key 1,2,3,4,5          # audio made with --watermark-key 1,2,3,4,5

Exit status: 0 if every file carries the key, 1 if one does not, 2 if a file cannot be read.
Files of any format, rate (8 kHz or more) and channel count are mixed to mono and resampled
to 44.1 kHz. Files longer than 19.6 s are read and scored in windows of 19.5 s (memory stays flat
with length; the phase search runs on the first window), with a progress line on a terminal.
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="csm-mlx verify", description="Check audio files for the SilentCipher watermark that csm-mlx "
               "(like the reference) puts on all the speech it makes.", epilog=EXAMPLES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files to check")
    p.add_argument("--key", type=watermark_key, default=PUBLIC_KEY, metavar="B,B,B,B,B",
                   help=f"the key to look for (default: the reference's public key {format_key(PUBLIC_KEY)})")
    p.add_argument("--search", choices=SEARCHES, default="fast",
                   help="phase search: fast (default: offset 0 first, then at most 25 decoder passes), exhaustive "
                        "(the reference's 205 passes), none (offset 0 only)")
    p.add_argument("--weights", metavar="DIR",
                   help="directory with SilentCipher's enc_c.ckpt, dec_c.ckpt and dec_m_0.ckpt "
                        "(default: Sony/SilentCipher from the hub)")
    return p


def report_error(path: str, e: Exception) -> None:
    print(f"csm-mlx: error: {e}" if str(path) in str(e) else f"csm-mlx: error: {path}: {e}", file=sys.stderr)


def progress(path: str, total_seconds: float):
    """A progress line rewritten on a terminal as the windows of a long file are scored."""
    if not sys.stderr.isatty():
        return None

    def show(samples: int) -> None:
        done = min(samples / SAMPLE_RATE, total_seconds)
        print(f"\rverifying {path}: {done:.0f}/{total_seconds:.0f} s", end="" if done < total_seconds else "\n",
              file=sys.stderr)

    return show


def run(args) -> int:
    status = 0
    readable = {}
    for path in args.files:  # headers first: no weights are loaded for files that cannot be read
        try:
            info = audio_info(path)
            check_verify_rate(info.samplerate)
            readable[path] = info.frames / info.samplerate
        except (AudioError, WatermarkError) as e:
            report_error(path, e)
            status = 2
    watermarker = Watermarker.load(args.weights) if readable else None
    for path, seconds in readable.items():
        try:
            shown = progress(path, seconds) if seconds * SAMPLE_RATE > LONG else None
            key, confidence = watermarker.verify_blocks(read_audio_blocks(path, SAMPLE_RATE), key=args.key,
                                                        search=args.search, progress=shown)
        except (AudioError, WatermarkError) as e:
            report_error(path, e)
            status = 2
            continue
        if key == args.key:
            print(f"{path}: watermarked (key {format_key(key)}, confidence {confidence:.2f})")
        else:
            found = f"decoded {format_key(key)}" if key is not None else "no message"
            print(f"{path}: not watermarked (with key {format_key(args.key)}; {found}, confidence {confidence:.2f})")
            status = max(status, 1)
    return status
