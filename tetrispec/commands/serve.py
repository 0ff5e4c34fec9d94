"""`tetrispec serve`: the OpenAI-compatible server (FastAPI + uvicorn) over one engine.

SIGTERM stops accepting connections, lets uvicorn finish the responses in flight, then
drains the engine thread and exits 0 (Ctrl-C does the same and exits 130).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

from tetrispec.commands.engine_args import _positive, add_engine_args, check_paths, engine_kwargs


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TETRISPEC_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on /v1 routes (default: $TETRISPEC_API_KEY)")
    p.add_argument("--max-waiting-requests", type=_positive, default=None,
                   help="answer 503 while this many requests wait to be scheduled (default: unbounded)")
    p.add_argument("--max-request-bytes", type=_positive, default=None,
                   help="answer 413 to a request body larger than this (default: 32 MiB)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the --model path, or the default model's name)")
    p.add_argument("--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(p)
    p.set_defaults(func=run)


def served_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model:
        return args.model
    from tetrispec.model.loader import default_target_path

    return Path(default_target_path()).name.split(".")[0]  # SmolLM2-135M-Instruct


def listen(host: str, port: int) -> socket.socket:
    """Bind before the model loads, so a busy port fails in a second, not after the load."""
    from tetrispec.cli import CLIError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        raise CLIError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    return sock


def run(args) -> int:
    import uvicorn

    from tetrispec.cli import CLIError
    from tetrispec.engine.async_engine import AsyncEngine
    from tetrispec.engine.llm_engine import LLMEngine
    from tetrispec.llm import build_config
    from tetrispec.server.api import build_app

    if args.api_key == "":  # would demand 'Bearer ' and nothing else: no client can send that key
        raise CLIError("--api-key is empty (is TETRISPEC_API_KEY set to ''?); give a key or unset it")
    check_paths(args)
    sock = listen(args.host, args.port)
    name = served_name(args)
    async_engine = AsyncEngine(LLMEngine(build_config(**engine_kwargs(args)))).start()
    app = build_app(async_engine, name, api_key=args.api_key, max_waiting_requests=args.max_waiting_requests,
                    max_request_bytes=args.max_request_bytes)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.uvicorn_log_level, timeout_graceful_shutdown=None))
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"tetrispec serve: {name} on http://{host}:{sock.getsockname()[1]}/v1 "
          f"(spec: {async_engine.snapshot.selector})", file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM gracefully, then re-raises it to the handler it found: make that
    # one a no-op so a clean shutdown exits 0 instead of dying by the signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        async_engine.shutdown(drain=True)
        signal.signal(signal.SIGTERM, previous)
    return 0
