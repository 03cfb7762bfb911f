"""`make test`: run every test layer with pytest and report the wall time.

The trainer layer (``tests/trainer``: torchrun on loopback, its own S3
server, ports picked free) needs no cluster stand-in, and the stand-in layers
spend most of their time waiting (poll intervals, grace periods, node-monitor
timeouts). So, unless pytest is given paths, three pytest processes run side
by side (:data:`GROUPS`): ``trainer`` (tests/trainer, unit, chart),
``standin`` (the integration and localcluster layers, and every module on a
per-pod-network stand-in) and ``cluster`` (the e2e and container layers whose
gangs use the host's network). Each one's lines are printed as they come,
prefixed with its name; the suite fails if any fails. Each has its own
``--basetemp`` (removed after a pass, kept after a failure). ``TJ_TEST_JOBS=1``
runs one pytest over ``tests``; named paths run in one pytest over just them.

pytest exits 5 when it collected no test; for this suite that means a broken
checkout or a bad filter, so it is reported as a failure with a clear message
instead of passing silently (with several processes: when none collected one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

#: Three pytest processes run side by side. Most of the stand-in layers' time is
#: waiting (poll intervals, grace periods, node-monitor timeouts), so the two CPUs
#: carry three. With two, CI took 1282 s in all (stop 16), and a fresh 2-core
#: machine here 1079 s of suite (trainer process 1071 s, stand-in process 989 s);
#: with three, 931 s. Two rules decide the split:
#:
#: * :data:`HOST_NETWORK`: gangs whose rank 0 binds the rendezvous port 29400 on
#:   the host's own network (process-mode e2e, container nodes). Two of them at
#:   once collide, so they run in one process, one after the other.
#: * :data:`NETNS`: the stand-ins with per-pod network namespaces. Run side by
#:   side they failed (the first module lost its S3 on the pod subnet's
#:   gateway while the other cut a node), so they run in one process too.
#:
#: Modules are listed by name, not ignored: pytest does not collect a file named on
#: its command line inside an ``--ignore``d folder. tests/unit/test_run.py checks
#: that the groups run every test once and keep each rule's modules together.
NETNS = ("tests/localcluster/test_netns.py", "tests/e2e/test_netns_jobs.py", "tests/containers/test_container_netns.py")
HOST_NETWORK = ("tests/e2e", "tests/containers")
#: The netns modules that live in the host-network folders: they run in ``standin``.
_NETNS_MOVED = tuple(m for m in NETNS if m.startswith(HOST_NETWORK))
#: The layers run side by side: name -> pytest arguments.
GROUPS = {
    "trainer": ["tests/trainer", "tests/unit", "tests/chart"],
    "standin": ["tests/integration", "tests/localcluster", *_NETNS_MOVED],
    "cluster": [*HOST_NETWORK, *(f"--ignore={m}" for m in _NETNS_MOVED)],
}
JOBS_ENV = "TJ_TEST_JOBS"


#: pytest options whose value is the next argument (so it is not a path).
_VALUE_OPTIONS = {"-k", "-m", "-p", "-o", "-c", "-W", "-r", "--durations", "--basetemp", "--timeout"}


def _has_paths(argv: list[str]) -> bool:
    """Whether the user named test paths (then pytest runs just them, in one process)."""
    return any(not a.startswith("-") and (i == 0 or argv[i - 1] not in _VALUE_OPTIONS) for i, a in enumerate(argv))


def _stream(*, name: str, proc: subprocess.Popen, out_lock: threading.Lock, ended: dict[str, float]) -> None:
    """Print ``proc``'s lines prefixed with ``name``; note when it ended in ``ended``."""
    for line in proc.stdout:
        with out_lock:
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()
    proc.wait()
    ended[name] = time.monotonic()


def _run_groups(argv: list[str]) -> dict[str, tuple[int, float]]:
    """Run every group at once; name -> (pytest exit code, wall seconds)."""
    base = tempfile.mkdtemp(prefix="tj-tests-")
    lock = threading.Lock()
    started, ended = {}, {}
    for name, args in GROUPS.items():
        extra = [] if any(a.startswith("--basetemp") for a in argv) else [f"--basetemp={base}/{name}"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", *args, *extra, *argv],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        reader = threading.Thread(target=_stream, daemon=True,
                                  kwargs={"name": name, "proc": proc, "out_lock": lock, "ended": ended})
        reader.start()
        started[name] = (proc, reader, time.monotonic())
    results = {}
    for name, (proc, reader, t0) in started.items():
        code = proc.wait()
        reader.join()
        results[name] = (code, ended[name] - t0)
    if all(code == 0 for code, _ in results.values()):
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"the layers' pytest temporary folders are kept in {base}", flush=True)
    return results


def _combined_code(codes: list[int]) -> int:
    """One exit code: any failure wins; "no tests" only when no group collected any."""
    real = [c for c in codes if c != pytest.ExitCode.NO_TESTS_COLLECTED]
    if not real:
        return int(pytest.ExitCode.NO_TESTS_COLLECTED)
    return max(real)


def main(argv: list[str]) -> int:
    start = time.monotonic()
    if os.environ.get(JOBS_ENV) == "1" or _has_paths(argv):
        code = int(pytest.main(["tests", *argv] if not _has_paths(argv) else argv))
    else:
        results = _run_groups(argv)
        for name, (rc, wall) in results.items():
            print(f"{name} layers: exit {rc}, wall time {wall:.1f} s", flush=True)
        code = _combined_code([rc for rc, _ in results.values()])
    wall = time.monotonic() - start
    print(f"\nsuite wall time: {wall:.1f} s", flush=True)
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("ERROR: pytest collected no tests (exit 5); the suite must never be empty.", file=sys.stderr)
        return 1
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
