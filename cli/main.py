"""`csm-mlx`: the command line. `csm-mlx TEXT` speaks; the other commands are subcommands.

Exit codes: 0 done, 2 a user error (one line on stderr), 130 Ctrl-C, 143 SIGTERM (and for
`verify`, 1: a file without the watermark). Both signals stop the same way at any moment:
temporary files are removed and finished work (turns, lines, the audio generated so far) is
kept as each command says.
"""

import importlib
import signal
import sys
from typing import Callable, List, Optional

# subcommand -> module under cli/; anything else is text for `speak`
COMMANDS = {"chat": "chat", "dialogue": "dialogue", "batch": "batch", "serve": "serve", "verify": "verify", "finetune": "finetune"}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return guarded("csm-mlx", lambda: run(argv))


def guarded(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body with SIGTERM stopping it as Ctrl-C does; return its exit code."""
    received = []

    def terminate(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return body()
    except KeyboardInterrupt:
        signum = received[0] if received else signal.SIGINT
        print(f"{prog}: {'terminated' if signum == signal.SIGTERM else 'interrupted'}", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(argv: List[str]) -> int:
    # imported here, under main's Ctrl-C handling: loading MLX takes seconds
    from .args import CliError, user_error_message

    name = argv[0] if argv[:1] and argv[0] in COMMANDS else None
    command = importlib.import_module(f".{COMMANDS[name] if name else 'speak'}", __package__)
    args = command.build_parser().parse_args(argv[1:] if name else argv)
    try:
        code = command.run(args)
    except CliError as e:
        print(f"csm-mlx: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise
        print(f"csm-mlx: error: {message}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
