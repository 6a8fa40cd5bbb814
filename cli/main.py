"""`csm-mlx`: the command line. `csm-mlx TEXT` speaks; `dialogue`, `batch` and `finetune` are subcommands."""

import sys
from typing import List, Optional

from . import batch, dialogue, finetune, speak
from .args import USER_ERRORS, CliError

COMMANDS = {"dialogue": (dialogue.build_parser, dialogue.run), "batch": (batch.build_parser, batch.run),
            "finetune": (finetune.build_parser, finetune.run)}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in COMMANDS:
        build, command = COMMANDS[argv[0]]
        args = build().parse_args(argv[1:])
    else:
        args, command = speak.build_parser().parse_args(argv), speak.run
    try:
        command(args)
    except (CliError, *USER_ERRORS) as e:
        print(f"csm-mlx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("csm-mlx: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
