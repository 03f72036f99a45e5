"""Command line of a job script: `--config recipe.yaml key.sub=value ...`; `--help` lists every recipe key.

    recipe, args = recipe_from_argv(sys.argv[1:], prog="launch/generate.py")
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from seesaw_ds.jobs.recipe import Recipe, load_recipe, recipe_help
from seesaw_ds.jobs.schema import RecipeError


def job_arg_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=recipe_help(),
        description="Run an offline generation job from a YAML recipe. Any recipe key can be overridden as "
                    "key.sub=value (the value is read as YAML), e.g. sampling.temperature=0.7 data.limit=100.")
    parser.add_argument("--config", required=True, help="recipe YAML file, e.g. recipes/arxiv.yaml")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    return parser


def recipe_from_argv(argv: Sequence[str] | None = None, prog: str | None = None) -> tuple[Recipe, argparse.Namespace]:
    """Parse the command line and load the recipe; a bad recipe exits with one error line (status 2)."""
    parser = job_arg_parser(prog)
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    unknown = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + [a[2:] for a in rest]  # --sampling.seed=1 works too
    try:
        recipe = load_recipe(args.config, args.overrides)
    except RecipeError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return recipe, args
