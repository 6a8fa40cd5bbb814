"""`csm-mlx verify FILE...`: does each file carry the watermark (the reference's public key, or --key)?"""

import argparse
import sys

from csm_mlx.audio import AudioError, read_audio
from csm_mlx.watermark import PUBLIC_KEY, SAMPLE_RATE, SEARCHES, Watermarker, WatermarkError, format_key

from .args import Parser, watermark_key

EXAMPLES = """examples:
  csm-mlx verify hello.wav clips/*.wav
  csm-mlx verify reply.flac --key 1,2,3,4,5          # audio made with --watermark-key 1,2,3,4,5

Exit status: 0 if every file carries the key, 1 if one does not, 2 if a file cannot be read.
Files of any format, rate and channel count are mixed to mono and resampled to 44.1 kHz.
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


def run(args) -> int:
    watermarker = Watermarker.load(args.weights)
    status = 0
    for path in args.files:
        try:
            audio = read_audio(path, max_seconds=None, sample_rate=SAMPLE_RATE)
            key, confidence = watermarker.verify(audio, SAMPLE_RATE, key=args.key, search=args.search)
        except (AudioError, WatermarkError) as e:
            print(f"csm-mlx: error: {e}" if str(path) in str(e) else f"csm-mlx: error: {path}: {e}", file=sys.stderr)
            status = 2
            continue
        if key == args.key:
            print(f"{path}: watermarked (key {format_key(key)}, confidence {confidence:.2f})")
        else:
            found = f"decoded {format_key(key)}" if key is not None else "no message"
            print(f"{path}: not watermarked (with key {format_key(args.key)}; {found}, confidence {confidence:.2f})")
            status = max(status, 1)
    return status
