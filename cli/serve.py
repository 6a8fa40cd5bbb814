"""`csm-mlx serve`: the OpenAI-compatible speech server (POST /v1/audio/speech and friends)."""

import argparse
import gc
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from csm_mlx.recognizer import DEFAULT_RECOGNIZER
from csm_mlx.chat.responder import DEFAULT_LANGUAGE_MODEL, DEFAULT_SYSTEM
from csm_mlx.options import check_options

from .args import CliError, Parser, add_model_arguments, load

EXAMPLES = """examples:
  csm-mlx serve                                      # http://127.0.0.1:8000/v1, the page at :8000/
  csm-mlx serve --host 0.0.0.0 --api-key "$KEY"       # reachable from the network: set a key
  csm-mlx serve --model csm-1b-8bit --max-batch 4 --voices-dir ~/voices

Point an OpenAI client at http://HOST:PORT/v1 (any API key unless --api-key is set; any model
name). Requests arriving together share each step of generation; each is streamed as it is made.
"""


def default_voices_dir() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "csm-mlx" / "voices"


def port_number(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {value!r}")
    return int(value)


def cors_origins(value: str) -> tuple:
    origins = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
    for origin in origins:
        scheme, _, rest = origin.partition("://")
        if origin != "*" and (scheme not in ("http", "https") or not rest or "/" in rest):
            raise argparse.ArgumentTypeError(f"{origin!r} is not an origin: use scheme://host[:port] "
                                             "(like http://localhost:3000) or *")
    if not origins:
        raise argparse.ArgumentTypeError("give at least one origin, or * for any")
    return origins


def seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number <= 3600:
        raise argparse.ArgumentTypeError(f"must be seconds from 0 to 3600, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="csm-mlx serve", description="Serve CSM through the OpenAI speech API, batching concurrent "
               "requests.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    g.add_argument("--port", type=port_number, default=8000, help="port (default: 8000)")
    g.add_argument("--api-key", metavar="KEY", default=os.environ.get("CSM_MLX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $CSM_MLX_API_KEY; none: open to anyone who can connect)")
    g.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="requests generated together (default: 8); more wait in the queue")
    g.add_argument("--max-queue", type=int, default=32, metavar="N",
                   help="requests that may wait for a row; beyond that 429 with Retry-After (default: 32; 0: none wait)")
    g.add_argument("--prefill-chunk", type=int, default=64, metavar="ROWS",
                   help="prompt rows of a joining request run between two frames of the running ones (default: 64)")
    g.add_argument("--voices-dir", type=Path, default=default_voices_dir(), metavar="DIR",
                   help=f"where voices made with POST /v1/audio/voices are kept (default: {default_voices_dir()})")
    g.add_argument("--model-name", default="csm-1b", metavar="NAME", help="model id listed by /v1/models (default: csm-1b)")
    g.add_argument("--cors-origins", type=cors_origins, default=(), metavar="ORIGINS",
                   help="web pages allowed to call the API from a browser: comma-separated origins such as "
                        "http://localhost:3000, or * for any (default: none)")
    g.add_argument("--shutdown-timeout", type=seconds, default=10.0, metavar="S",
                   help="on SIGTERM or Ctrl-C, how long running responses may finish before they are cut "
                        "(default: 10); a second signal stops at once")
    g.add_argument("--no-ui", action="store_true",
                   help="do not serve the web page at / (the API is the same either way)")
    g = p.add_argument_group("voice chat (the /v1/realtime WebSocket, OpenAI Realtime events; on with both "
                             "--asr and --llm)")
    g.add_argument("--asr", metavar="ID_OR_DIR", help=f"speech recognizer, an mlx-whisper or parakeet-mlx model (e.g. {DEFAULT_RECOGNIZER}); "
                                                      "alone, it transcribes voice clips uploaded without a transcript")
    g.add_argument("--llm", metavar="ID_OR_DIR", help=f"language model, any mlx-lm model (e.g. {DEFAULT_LANGUAGE_MODEL})")
    g.add_argument("--system", default=DEFAULT_SYSTEM, metavar="TEXT",
                   help="the language model's system prompt, unless a session sets instructions (default: short, spoken answers)")
    add_model_arguments(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    g.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return p


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, made before the model loads so a taken port fails at once."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port} ({e.strerror if isinstance(e, OSError) else e}): "
                       "choose another --port or --host") from None
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load_chat(args, engine):
    """The speech recognizer and (with --llm) the language model, loaded on the engine's thread
    (where every MLX call runs)."""
    from csm_mlx.recognizer import Recognizer
    from csm_mlx.chat.responder import Responder
    from csm_mlx.server.realtime import ChatModels

    logging.getLogger("csm_mlx").info("loading %s", ", ".join(filter(None, [args.asr, args.llm])))
    responder = engine.call(lambda: Responder.load(args.llm, args.system)) if args.llm else None
    return ChatModels(engine.call(lambda: Recognizer.load(args.asr)), responder, args.system)


def run(args) -> None:
    try:  # the extra's packages, each checked here even where an earlier import cached ours
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        from csm_mlx.server import build_app
        from csm_mlx.server.graceful import serve
        from csm_mlx.server.memory import limit_malloc_arenas
    except ImportError as e:
        raise CliError(f"the server needs its extra ({e.name} is missing): pip install 'csm-mlx[server]'") from None
    options = check_options(batch_size=args.max_batch)
    if args.max_queue < 0 or args.prefill_chunk < 1:
        raise CliError("--max-queue must be >= 0 and --prefill-chunk >= 1")
    if args.voices_dir.exists() and not args.voices_dir.is_dir():
        raise CliError(f"--voices-dir {args.voices_dir} is not a directory")
    if not is_loopback(args.host) and not args.api_key:
        print(f"csm-mlx: warning: listening on {args.host} without --api-key: anyone who can reach this port can "
              "use the server", file=sys.stderr)
    if args.llm and not args.asr:
        raise CliError("--llm needs --asr: voice chat hears the user through the speech recognizer")
    sock = listen(args.host, args.port)
    limit_malloc_arenas()  # before the engine's and the workers' threads exist
    csm = load(args)
    engine = csm.engine(options["batch_size"], max_queue=args.max_queue, prefill_chunk=args.prefill_chunk)
    try:
        chat = load_chat(args, engine) if args.asr else None
        app = build_app(csm, engine, args.voices_dir, api_key=args.api_key, model_name=args.model_name,
                        cors_origins=args.cors_origins, ui=not args.no_ui, chat=chat)
        level = "warning" if args.quiet else "info" if args.verbose else "warning"
        logging.basicConfig(format="csm-mlx: %(message)s")
        logging.getLogger("csm_mlx").setLevel(logging.WARNING if args.quiet else logging.INFO)
        if not args.quiet:
            page = "" if args.no_ui else f", the page at http://{args.host}:{args.port}/"
            print(f"csm-mlx: serving {args.model} at http://{args.host}:{args.port}/v1{page} "
                  f"(max batch {args.max_batch}, voices in {args.voices_dir})", file=sys.stderr)
        serve(app, sock, args.shutdown_timeout, level, args.verbose)
    finally:
        engine.close()
        sock.close()
    # Everything is closed: the interpreter's last collections over every object (model, FastAPI,
    # and torch where installed) would add ~0.6 s to a stop that a service manager is timing.
    gc.freeze()
    print("csm-mlx: stopped", file=sys.stderr, flush=True)
