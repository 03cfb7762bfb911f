"""Issue 8 (shape of the code): the library patches fail at import on an untested version."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trainingjob_trainer import backends


def test_version_guard_accepts_the_pinned_versions_and_rejects_others():
    backends.check_versions({"torch": "2.13.0+cpu", "torchsnapshot-nightly": "2024.7.26"})
    backends.check_versions({"torch": "2.13.0", "torchsnapshot-nightly": None})  # DCP-only image
    with pytest.raises(ImportError, match=r"torch and was tested with 2\.13\.0 only; 2\.14\.0 is installed"):
        backends.check_versions({"torch": "2.14.0", "torchsnapshot-nightly": "2024.7.26"})
    with pytest.raises(ImportError, match="torchsnapshot-nightly==2024.7.26"):
        backends.check_versions({"torch": "2.13.0", "torchsnapshot-nightly": "2025.1.1"})


def test_version_guard_runs_at_import():
    """Importing the module with another torch version reported fails with the message (a fresh interpreter)."""
    code = ("import torch; torch.__version__ = '2.99.0'\n"
            "import trainingjob_trainer.backends\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "ImportError" in r.stderr and "2.99.0 is installed" in r.stderr, r.stderr[-2000:]
