"""`make test`: run every test layer with pytest and report the wall time.

pytest exits 5 when it collected no test; for this suite that means a broken
checkout or a bad filter, so it is reported as a failure with a clear message
instead of passing silently.
"""

from __future__ import annotations

import sys
import time

import pytest


def main(argv: list[str]) -> int:
    start = time.monotonic()
    code = pytest.main(["tests", *argv])
    wall = time.monotonic() - start
    print(f"\nsuite wall time: {wall:.1f} s", flush=True)
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("ERROR: pytest collected no tests (exit 5); the suite must never be empty.", file=sys.stderr)
        return 1
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
