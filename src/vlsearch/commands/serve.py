"""`vlsearch serve`: the search service and web page (FastAPI + uvicorn) over one index."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from vlsearch.errors import CheckpointError, QueryError, VLSearchError
from vlsearch.settings import default_index_dir

# Heavy imports (torch, faiss, FastAPI and the vlsearch layers on them) are inside the functions: `vlsearch`
# imports every command module to build its parser, and only the command that runs should load them.


def register(sub):
    p = sub.add_parser("serve", help="serve an index over HTTP: JSON API and a web page")
    p.add_argument("--index", default=None, help="index folder (default: the one `vlsearch demo` built)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--model", default=None, help="dual encoder (default: the one the index was built with)")
    p.add_argument(
        "--rerank-model",
        default="slow",
        help="pair scorer for re-ranking; used when its checkpoint exists (default: slow)",
    )
    p.add_argument("--no-rerank", action="store_true", help="serve without the Slow re-ranker")
    p.add_argument(
        "--rerank-features",
        choices=["full", "compact"],
        default="full",
        help="what the re-ranker reads per image: the full maps, or int8 parts (~41 KB, stored on first use)",
    )
    p.add_argument(
        "--write-token",
        default=None,
        metavar="TOKEN",
        help="allow POST /images with 'Authorization: Bearer TOKEN'; visible in argv: prefer "
        "VLSEARCH_WRITE_TOKEN or --write-token-file",
    )
    p.add_argument("--write-token-file", default=None, metavar="FILE", help="read the write token from FILE")
    p.add_argument(
        "--read-token",
        default=None,
        metavar="TOKEN",
        help="make the library private: search, images and the page need this token (visible in argv: "
        "prefer VLSEARCH_READ_TOKEN or --read-token-file)",
    )
    p.add_argument("--read-token-file", default=None, metavar="FILE", help="read the read token from FILE")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        metavar="NAME",
        help="a Host header name to answer (repeatable); default: loopback names when bound to loopback",
    )
    p.add_argument(
        "--follow-symlinks",
        action="store_true",
        default=None,
        help="serve image files reached through symlinks (default: as the index was built)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="model threads (default: one per core, at most 4)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="model requests allowed to wait for a thread; beyond that, 503 + Retry-After (default: 16)",
    )
    p.add_argument(
        "--max-rerank-queue",
        type=int,
        default=8,
        help="of those, re-ranking (and adding) requests allowed to wait (default: 8)",
    )
    p.add_argument("--max-upload-mb", type=float, default=20, help="upload size cap in MB (default: 20)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def rerank_choice(args) -> tuple[str | None, str]:
    """(re-rank model to load or None, why re-ranking is off)."""
    import importlib.util

    from vlsearch.models.checkpoint import WEIGHTS
    from vlsearch.models.registry import NAMED_MODELS, default_checkpoint

    if args.no_rerank:
        return None, "re-ranking was turned off with --no-rerank"
    name = args.rerank_model
    if name in NAMED_MODELS and not (default_checkpoint(name) / WEIGHTS).is_file():
        return None, (
            f"no {name!r} model checkpoint at {default_checkpoint(name)}: train it with "
            f"`{NAMED_MODELS[name]}` (or `make models`) and restart the service"
        )
    if importlib.util.find_spec("vlsearch.search.rerank") is None:
        return None, "this version of vlsearch has no re-ranker (vlsearch.search.rerank)"
    return name, ""


def open_engine(index_dir: Path, model: str | None, rerank_model: str | None, rerank_compact: bool = False):
    """Open index, dual encoder and re-ranker; anything unexpected becomes a clear error (exit 2)."""
    from vlsearch.search.engine import SearchEngine

    try:
        return SearchEngine.open(
            index_dir, model=model, rerank_model=rerank_model, rerank_compact=rerank_compact
        )
    except VLSearchError as e:
        if rerank_model and isinstance(e, CheckpointError) and "slow" in str(e).lower():
            raise CheckpointError(f"{e} (or start with --no-rerank)") from e
        raise
    except Exception as e:  # torch / safetensors / faiss errors on a damaged file
        what = f"model {model or 'of the index'}" + (
            f" or re-ranker {rerank_model!r}" if rerank_model else ""
        )
        raise CheckpointError(
            f"could not load the {what} for {index_dir} ({type(e).__name__}: {e}); "
            "retrain or rebuild it" + (", or start with --no-rerank" if rerank_model else "")
        ) from e


def listen(host: str, port: int) -> socket.socket:

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        raise VLSearchError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from e
    sock.set_inheritable(True)
    return sock


def read_token_option(value: str | None, file: str | None, env: str, what: str) -> str | None:
    """A token from the flag (warned: argv is visible to every user), a file, or the environment."""
    from vlsearch.serve.gate import MIN_TOKEN_LENGTH

    if value:
        print(
            f"vlsearch serve: WARNING: --{what}-token is visible to other users in the process list; "
            f"use {env} or --{what}-token-file",
            file=sys.stderr,
        )
    elif file:
        try:
            value = Path(file).expanduser().read_text().strip()
        except OSError as e:
            raise QueryError(f"cannot read --{what}-token-file {file}: {e.strerror or e}") from e
    else:
        value = os.environ.get(env) or None
    if value is not None and len(value) < MIN_TOKEN_LENGTH:
        raise QueryError(f"the {what} token is {len(value)} characters; use at least {MIN_TOKEN_LENGTH}")
    return value


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, given: list[str] | None) -> tuple[str, ...] | None:
    """--allowed-host names; by default the loopback names when bound to loopback, else any Host."""
    from vlsearch.serve.gate import LOOPBACK_HOSTS

    if given:
        return tuple(h.lower() for h in given) + LOOPBACK_HOSTS
    return LOOPBACK_HOSTS if is_loopback(host) else None


def run(args):
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every fallback at INFO
    if not 0 <= args.port <= 65535:
        raise QueryError(f"--port must be between 0 and 65535, not {args.port}")
    if (
        min(args.max_queue, args.max_rerank_queue) < 0
        or (args.workers is not None and args.workers < 1)
        or args.max_upload_mb <= 0
    ):
        raise QueryError(
            "--workers must be >= 1, --max-queue and --max-rerank-queue >= 0, --max-upload-mb > 0"
        )
    index_dir = Path(args.index).expanduser() if args.index else default_index_dir()
    token = read_token_option(args.write_token, args.write_token_file, "VLSEARCH_WRITE_TOKEN", "write")
    args.read_token_value = read_token_option(
        args.read_token, args.read_token_file, "VLSEARCH_READ_TOKEN", "read"
    )
    args.allowed_hosts = allowed_hosts(args.host, args.allowed_host)
    if not is_loopback(args.host) and not args.read_token_value:
        print(
            f"vlsearch serve: WARNING: listening on {args.host} without a read token: anyone who can reach "
            "this port can search and download every image; set VLSEARCH_READ_TOKEN",
            file=sys.stderr,
        )
    sock = listen(args.host, args.port)  # fail fast on a busy port, before loading models
    try:
        return _serve(args, sock, index_dir, token)
    finally:
        sock.close()


def _serve(args, sock, index_dir: Path, token: str | None) -> int:
    rerank_model, note = rerank_choice(args)
    print(f"vlsearch serve: loading {index_dir} ...", file=sys.stderr, flush=True)
    engine = open_engine(index_dir, args.model, rerank_model, args.rerank_features == "compact")

    from vlsearch.serve.app import ServeSettings, create_app

    cores = os.cpu_count() or 1
    workers = args.workers or min(4, cores)
    settings = ServeSettings(
        workers=workers,
        threads_per_worker=max(1, cores // workers),
        max_queue=args.max_queue,
        max_rerank_queue=args.max_rerank_queue,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        write_token=token,
        read_token=args.read_token_value,
        allowed_hosts=args.allowed_hosts,
        follow_symlinks=args.follow_symlinks,
        rerank_model=rerank_model,
        rerank_note=note,
    )
    app = create_app(engine, settings)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"vlsearch serve: {len(engine.index.images)} images from {index_dir}; "
        f"re-ranking {'on (' + str(rerank_model) + ')' if engine.reranker is not None else 'off: ' + note}; "
        f"adding images {'on (token required)' if token else 'off'}; "
        f"{'private (read token required)' if settings.read_token else 'public'}\n"
        f"vlsearch serve: open http://{shown}:{port}/  (Ctrl+C to stop)",
        file=sys.stderr,
        flush=True,
    )
    import uvicorn

    from vlsearch.serve.protocol import uvicorn_config

    # header deadlines per connection; model work has its own, much smaller, bounded queue
    config = uvicorn_config(app, log_level=args.log_level, access_log=args.access_log)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the signal after its graceful shutdown
        pass
    print("vlsearch serve: stopped", file=sys.stderr)
    return 0
