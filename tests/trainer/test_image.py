"""The training image: what can be checked without a Docker engine."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

from trainingjob_trainer import contract
from trainingjob_trainer.launch import decide_exit

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "trainer_image" / "Dockerfile"


def test_dockerfile_pins_official_base_installs_trainer_extra_and_runs_non_root():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("pytorch/pytorch:2.13.0-"), base  # official image, the torch version we pin
    assert re.search(r'pip install -c \S+ "\.\[trainer\]"', text)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0"))
    assert 'ENTRYPOINT ["python", "-m", "trainingjob_trainer.launch"]' in text


def test_entrypoint_runs_the_example_under_torchrun(tmp_path):
    """The image's ENTRYPOINT + CMD (shortened) on this machine: torchrun, 2 workers, no snapshots."""
    term = tmp_path / "termination-log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TJ_", "PET_"))}
    env.update({contract.PET_NPROC_PER_NODE: "2", contract.ENV_TERMINATION_MESSAGE_PATH: str(term),
                "OMP_NUM_THREADS": "1"})
    r = subprocess.run(
        [sys.executable, "-m", "trainingjob_trainer.launch", "--standalone",
         "-m", "trainingjob_trainer.example", "--steps", "3"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "[example] world=2" in r.stdout and "done at step 3" in r.stdout
    msg = contract.parse_termination_message(term.read_text())
    assert msg.reason == contract.TERM_REASON_COMPLETED and msg.step == 3


def test_launcher_exit_decisions():
    pre = contract.TerminationMessage(reason=contract.TERM_REASON_PREEMPTED, step=7, snapshot="s3://b/x")
    # The node whose torchrun saw its workers "fail" with 83 still reports preempted.
    assert decide_exit(torchrun_rc=1, message=pre, got_sigterm=False) == (contract.EXIT_PREEMPTED_AFTER_SNAPSHOT, None)
    assert decide_exit(torchrun_rc=1, message=pre, got_sigterm=True) == (contract.EXIT_PREEMPTED_AFTER_SNAPSHOT, None)
    code, msg = decide_exit(torchrun_rc=0, message=None, got_sigterm=False)
    assert code == contract.EXIT_OK and msg.reason == contract.TERM_REASON_COMPLETED
    code, msg = decide_exit(torchrun_rc=1, message=None, got_sigterm=True)
    assert code == 143 and msg.reason == contract.TERM_REASON_PREEMPTED_NO_SNAPSHOT
    code, msg = decide_exit(torchrun_rc=2, message=None, got_sigterm=False)
    assert code == 2 and msg.reason == contract.TERM_REASON_ERROR


def test_launcher_reports_the_last_step_when_workers_died_silently():
    # A peer node vanished: the workers died in a collective without a message.
    code, msg = decide_exit(torchrun_rc=1, message=None, got_sigterm=False, last_step=23)
    assert code == 1 and msg.reason == contract.TERM_REASON_ERROR and msg.step == 23
    code, msg = decide_exit(torchrun_rc=1, message=None, got_sigterm=True, last_step=23)
    assert msg.reason == contract.TERM_REASON_PREEMPTED_NO_SNAPSHOT and msg.step == 23
    code, msg = decide_exit(torchrun_rc=0, message=None, got_sigterm=False, last_step=40)
    assert code == 0 and msg.reason == contract.TERM_REASON_COMPLETED


def test_launcher_leaves_a_message_before_the_grace_period_ends(tmp_path):
    """Workers that cannot finish (hung in a collective) still get the step reported before SIGKILL."""
    import signal
    import subprocess
    import sys
    import time

    term = tmp_path / "term"
    script = tmp_path / "hang.py"
    script.write_text("import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "open(os.environ['TJ_PROGRESS_FILE'], 'w').write('17')\n"
                      "open(os.environ['READY'], 'w').close()\ntime.sleep(120)\n")
    ready = tmp_path / "ready"
    env = {**os.environ, contract.ENV_TERMINATION_MESSAGE_PATH: str(term),
           contract.ENV_GRACE_PERIOD_SECONDS: "3", "READY": str(ready)}
    p = subprocess.Popen([sys.executable, "-m", "trainingjob_trainer.launch", "--nproc-per-node", "1",
                          "--standalone", str(script)], env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists()
        p.send_signal(signal.SIGTERM)
        time.sleep(2.5)  # grace 3 s: the launcher writes at grace - 2 s
        msg = contract.parse_termination_message(term.read_text())
        assert msg is not None and msg.reason == contract.TERM_REASON_PREEMPTED_NO_SNAPSHOT and msg.step == 17
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
