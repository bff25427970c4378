"""`cispo serve`: an HTTP server that the `tinker` Python SDK (0.38.x) drives unchanged.

    CISPO_API_KEY=tml-local cispo serve --port 8000 --root runs/server
    TINKER_API_KEY=tml-local python -c "import tinker; tinker.ServiceClient(base_url='http://127.0.0.1:8000')"

It serves the same engine as the in-process client (`cispo.client`); see docs/server.md for the
endpoints, the supported SDK range, losses and the security defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["serve_main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cispo serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default loopback; anything else exposes the server)",
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=None,
        help="required X-API-Key value (default: $CISPO_API_KEY). The tinker SDK "
        "only sends keys that start with 'tml-'",
    )
    parser.add_argument(
        "--base-model",
        action="append",
        default=None,
        help="a base model clients may train: 'tiny', 'smollm2-135m' or a local HF "
        "directory; repeat for several (default: tiny)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("runs/server"),
        help="directory for tinker:// checkpoints and training-run records",
    )
    parser.add_argument("--max-request-mb", type=float, default=64.0)
    parser.add_argument(
        "--full-finetune",
        action="store_true",
        help="train every parameter even when a client asks for LoRA",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def serve_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    api_key = args.api_key or os.environ.get("CISPO_API_KEY", "")
    if not api_key:
        print("cispo serve: an API key is required (--api-key or $CISPO_API_KEY)", file=sys.stderr)
        return 2
    import uvicorn

    from cispo.server.app import create_app
    from cispo.server.runtime import ServerConfig

    try:
        config = ServerConfig(
            root=args.root,
            api_key=api_key,
            base_models=tuple(args.base_model or ["tiny"]),
            seed=args.seed,
            full_finetune=args.full_finetune,
            max_request_bytes=int(args.max_request_mb * (1 << 20)),
        )
    except ValueError as error:
        print(f"cispo serve: {error}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
    return 0
