"""Which rank speaks, on which stream (bigpt/runtime/console.py); a whole job's output per rank is
checked in tests/test_fault_tolerance.py (a NaN loss skipped)."""

import pytest

from bigpt.runtime import console


def say_everything():
    console.say("a step line")
    console.note("a note")
    console.warn("a warning")
    console.error("an error every rank meets")
    console.rank_error("an error of this rank")


@pytest.mark.parametrize("rank,world", [(None, None), ("3", "4")])
def test_the_last_rank_or_a_lone_process_speaks(rank, world, monkeypatch, capsys):
    for name, value in (("RANK", rank), ("WORLD_SIZE", world)):
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    say_everything()
    out, err = capsys.readouterr()
    assert out == "a step line\n"
    who = " (rank 3)" if rank else ""
    assert err.splitlines() == [
        "bigpt: a note",
        "bigpt: warning: a warning",
        "bigpt: error: an error every rank meets",
        f"bigpt: error{who}: an error of this rank",
    ]


def test_other_ranks_say_only_their_own_errors(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    say_everything()
    assert capsys.readouterr() == ("", "bigpt: error (rank 0): an error of this rank\n")
