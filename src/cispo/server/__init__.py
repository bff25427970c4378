"""`cispo serve`: an HTTP server that the `tinker` Python SDK (0.38.x) drives unchanged.

    CISPO_API_KEY=tml-local cispo serve --port 8000 --root runs/server
    cispo serve --keys-file keys.txt     # one "<key> [<user>]" a line: users isolated
    TINKER_API_KEY=tml-local python -c "import tinker; tinker.ServiceClient(base_url='http://127.0.0.1:8000')"

It serves the same engine as the in-process client (`cispo.client`); see docs/server.md for the
endpoints, the supported SDK range, losses and the security defaults.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import tyro

from cispo.server.runtime import ServerConfig

__all__ = ["ServeArgs", "serve_main"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeArgs:
    """`cispo serve`'s options: where to listen, and the `ServerConfig` (its fields at the top
    level; their help is their docstrings)."""

    host: str = "127.0.0.1"
    """Bind address (loopback by default; anything else exposes the server to the network)."""
    port: int = 8000
    """TCP port to listen on."""
    server: Annotated[ServerConfig, tyro.conf.arg(name="")]

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")


def serve_main(argv: list[str]) -> int:
    """`cispo serve ARGV...`: parse (tyro), then run uvicorn until interrupted. Bad options and
    values the config refuses print a message and raise SystemExit(2)."""
    api_key = os.environ.get("CISPO_API_KEY", "")
    # Built without validation: the key may come from --api-key or --keys-file, checked below.
    template = object.__new__(ServerConfig)
    for f in dataclasses.fields(ServerConfig):
        default_value: Any = f.default
        if f.default_factory is not dataclasses.MISSING:
            default_value = f.default_factory()
        object.__setattr__(template, f.name, default_value)
    object.__setattr__(template, "root", Path("runs/server"))
    object.__setattr__(template, "api_key", api_key)
    default = ServeArgs(server=template)
    try:
        args = tyro.cli(
            ServeArgs,
            args=argv,
            default=default,
            prog="cispo serve",
            description=__doc__,
            config=(tyro.conf.AvoidSubcommands,),  # engine: None stays None, not a subcommand
        )
    except ValueError as error:  # ServerConfig's own validation
        print(f"cispo serve: {error}", file=sys.stderr)
        return 2
    import uvicorn

    from cispo.server.app import create_app

    uvicorn.run(create_app(args.server), host=args.host, port=args.port, log_level="warning")
    return 0
