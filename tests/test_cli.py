"""Every program in launchers/ and tools/ follows bigpt.cli's convention."""

import importlib.util
from pathlib import Path

import pytest

from bigpt.cli import Parser

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = sorted([*ROOT.glob("launchers/*.py"), *ROOT.glob("tools/*.py")])
OUTPUT_FLAGS = {"--out", "--output-prefix"}


def _parser(path: Path) -> Parser:
    spec = importlib.util.spec_from_file_location(f"cli_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parser


def _all_parsers(parser):
    yield parser
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        yield from action.choices.values()


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_each_program_has_one_module_level_parser_and_one_meaning_per_output_flag(path):
    parser = _parser(path)
    assert isinstance(parser, Parser)
    for each in _all_parsers(parser):
        flags = {flag for action in each._actions for flag in action.option_strings if flag.startswith("--")}
        outputs = {flag for flag in flags if flag[2:].split("-")[0] in ("out", "output")}
        assert outputs <= OUTPUT_FLAGS, f"{path.name}: an output flag other than {OUTPUT_FLAGS}"


@pytest.mark.parametrize(
    "program, options",
    [
        ("tools/curate.py", ["--restart", "--verbose"]),
        ("launchers/run.py", ["--dry-run"]),
        ("tools/plan.py", ["--gpus", "8"]),
    ],
)
def test_overrides_may_follow_options(program, options):
    """`PROGRAM RECIPE --flag a.b=1` means `PROGRAM RECIPE a.b=1 --flag` (curate once refused it)."""
    parser = _parser(ROOT / program)
    after = parser.parse_args(["r.toml", *options, "a.b=1", "c.d=2"])
    before = parser.parse_args(["r.toml", "a.b=1", "c.d=2", *options])
    assert after == before and after.overrides == ["a.b=1", "c.d=2"]
