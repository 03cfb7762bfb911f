"""tests/run.py: the side-by-side layers report one exit code, and an empty suite is never a pass."""

from __future__ import annotations

import pytest

from tests import run


def test_speed_item3_any_failing_group_fails_the_suite():
    assert run._combined_code([0, 0]) == 0
    assert run._combined_code([0, 1]) == 1
    assert run._combined_code([pytest.ExitCode.NO_TESTS_COLLECTED, 0]) == 0  # a -k that selects one layer only
    assert run._combined_code([pytest.ExitCode.NO_TESTS_COLLECTED, 1]) == 1


def test_speed_item3_no_group_collecting_a_test_is_an_error(capsys, monkeypatch):
    monkeypatch.delenv(run.JOBS_ENV, raising=False)
    # Two real pytest processes, over one small file (collecting the whole suite twice costs 10-20 s).
    monkeypatch.setattr(run, "GROUPS", {"trainer": ["tests/unit/test_run.py"], "cluster": ["tests/unit/test_run.py"]})
    assert run.main(["-q", "-k", "no_test_has_this_name_anywhere"]) == 1
    out = capsys.readouterr()
    assert "collected no tests" in out.err
    assert "trainer layers: exit 5" in out.out and "cluster layers: exit 5" in out.out


def test_speed_item3_named_paths_run_in_one_pytest():
    assert run._has_paths(["tests/unit", "-k", "x"]) and run._has_paths(["tests/unit/test_run.py::test_a"])
    assert not run._has_paths(["-q", "-k", "tests", "--durations", "20", "-m", "slow"])  # option values


def _collected(args: list[str]) -> list[str]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "::" in line]


def test_speed_item3_the_groups_run_every_test_once():
    """The side-by-side groups split the suite: no test is left out by an ``--ignore``, none runs twice,
    the host-network gangs run in one process and the per-pod-network stand-ins in one process."""
    whole = _collected(["tests"])
    groups = {name: _collected(args) for name, args in run.GROUPS.items()}
    together = [t for ids in groups.values() for t in ids]
    assert len(together) == len(set(together)), "a test is collected by two groups"
    assert sorted(together) == sorted(whole)

    def group_of(test: str) -> str:
        return next(name for name, ids in groups.items() if test in ids)

    netns = {group_of(t) for t in whole if t.startswith(run.NETNS)}
    host = {group_of(t) for t in whole if t.startswith(run.HOST_NETWORK) and not t.startswith(run.NETNS)}
    assert len(netns) == 1 and len(host) == 1 and netns != host, (netns, host)
    for module in run.NETNS:
        assert any(t.startswith(module) for t in whole), f"{module} has no test: NETNS is out of date"
    assert any(t.startswith("tests/trainer/") for t in groups["trainer"])
