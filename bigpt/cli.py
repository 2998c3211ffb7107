"""The command line of every bigpt program (launchers/ and tools/), one convention for all:

- A program that reads a recipe takes it first, then dotted ``table.key=value`` overrides, in any
  order with its options (``run.py R --dry-run a.b=1`` is ``run.py R a.b=1 --dry-run``).
- ``--out PATH`` is the one file or directory a program writes; ``--output-prefix P`` names the
  several files ``P.*`` it writes. No other flag names an output.
- ``--overwrite`` is the one flag that lets a program replace an output file bigpt did not write;
  without it, such a file is refused before any work, named in one paragraph.
- A path argument may start with ``~`` (the user's home) even where the shell leaves it as is
  (``--out=~/x``, a quoted ``"~/my data"``); relative paths are relative to the working directory.
- Each program builds its parser once, at module level (``parser``), so ``--help``, the program
  and its tests read the same one.
"""

import argparse
import os
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """A program's parser: its module docstring as the help text, layout kept; positionals (a
    recipe's overrides) may come before, between or after options."""

    def __init__(self, doc: str | None = None, **kwargs):  # subcommands' parsers are made with keywords only
        kwargs.setdefault("description", doc)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def parse_args(self, args=None, namespace=None):
        if self._subparsers is not None:  # argparse cannot intermix with subcommands
            parsed = super().parse_args(args, namespace)
        else:
            parsed = self.parse_intermixed_args(args, namespace)
        for name, value in vars(parsed).items():
            setattr(parsed, name, _home_expanded(value))
        return parsed


def _home_expanded(value):
    """An argument's ``~`` or ``~/...`` as the shell would expand it (a ``table.key=~/x`` override
    is the recipe loader's to expand)."""
    if isinstance(value, list):
        return [_home_expanded(item) for item in value]
    if isinstance(value, str | Path) and str(value).startswith("~"):
        return type(value)(os.path.expanduser(value))
    return value


def recipe_parser(
    doc: str, recipe_help: str = "path to a TOML recipe", example: str = "train.train_iters=200"
) -> Parser:
    """A parser whose program reads a recipe and its overrides."""
    parser = Parser(doc)
    parser.add_argument("recipe", help=recipe_help)
    parser.add_argument("overrides", nargs="*", metavar="table.key=value", help=f"dotted overrides, e.g. {example}")
    return parser


def add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    """The program's ``--overwrite``: replace ``what`` (its outputs) even when bigpt did not write them."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} (refused otherwise)")
