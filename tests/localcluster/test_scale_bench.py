"""Issue 10: ``bench/scale.py --quick`` runs end to end and the operator handles every preemption.

The real operator against a hollow stand-in (20 jobs x 4 pods, SeaweedFS
behind counting proxies). Asserts the shape of the printed ``scale`` line and
that every preempted job got a fencing DELETE and a new gang; it asserts no
timing (speed goals live in the benchmark's own met / missed lines).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NUM = r"[0-9]+(?:\.[0-9]+)?"
FIELDS = ("reaction_p50_s", "reaction_p99_s", "create_p99_s", "create_from_disruption_p99_s", "operator_rss_mb", "operator_cpu_s_per_min",
          "api_rps_per_job", "s3_rps_per_job")
LINE = re.compile(r"^scale jobs=20 pods=80 " + " ".join(f"{f}=(?P<{f}>{NUM})" for f in FIELDS)
                  + r" preemptions=(?P<preemptions>\d+) handled=(?P<handled>\d+)$", re.M)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_scale_bench_quick_handles_every_preemption() -> None:
    proc = subprocess.run([sys.executable, "bench/scale.py", "--jobs", "20", "--pods-per-job", "4", "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=170)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    m = LINE.search(proc.stdout)
    assert m, f"no well-formed scale line in:\n{out[-4000:]}"
    assert int(m["preemptions"]) == 20 and int(m["handled"]) == 20, m.group(0)
    assert float(m["operator_rss_mb"]) > 0 and float(m["api_rps_per_job"]) > 0, m.group(0)
    assert "Targets at 20 jobs x 4 pods:" in proc.stdout
    # Every preempted job's old pods were seen going away (the create target is measured from there).
    assert "| preemptions (20 over the spread) | 20 handled (20 with every old pod's removal logged) |" in proc.stdout
