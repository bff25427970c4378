"""The `cispo` command line.

cispo train                                  # the embedded default recipe
cispo train arithmetic_cispo --rl.steps=50   # a recipe by name, with dotted overrides
cispo train path/to/recipe.py --resume --run.dir=runs/x
cispo config [RECIPE] [overrides]            # print the resolved config and exit
cispo serve --api-key tml-... [--port 8000]  # a server for the tinker SDK (docs/server.md)
cispo export CHECKPOINT_OR_RUN_DIR OUT       # HF model directory (+ PEFT adapter for LoRA)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEFAULT_RECIPE = "arithmetic_cispo"


def _resolve(recipe: str | None, overrides: Sequence[str]):  # type: ignore[no-untyped-def]
    from cispo.configs import apply_overrides, load_recipe

    return apply_overrides(load_recipe(recipe or DEFAULT_RECIPE), list(overrides))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from cispo.server import serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["export"]:
        from cispo.export import export_main

        return export_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="cispo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a training job")
    train.add_argument("recipe", nargs="?", help=f"recipe name or file (default {DEFAULT_RECIPE})")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    show = sub.add_parser("config", help="print the resolved config")
    show.add_argument("recipe", nargs="?")
    sub.add_parser("serve", help="serve the tinker SDK's HTTP protocol (cispo serve --help)")
    args, overrides = parser.parse_known_args(argv)
    recipe = args.recipe
    if recipe is not None and recipe.startswith("--"):
        overrides, recipe = [recipe, *overrides], None
    try:
        config = _resolve(recipe, overrides)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"cispo: {error}", file=sys.stderr)
        return 2
    if args.command == "config":
        from cispo.configs import format_config

        print(format_config(config))
        return 0
    from cispo.train.loop import train as run_training

    run_training(config, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
