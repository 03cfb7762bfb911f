"""Issue 8 item 4 (launcher part): a failed run's termination message carries the cause's last lines."""

from __future__ import annotations

import os
import subprocess
import sys

from trainingjob_trainer import contract, launch

_WORKER = '''
import os
def upload():
    raise OSError("S3 upload of epoch_0_train_step_8/__0_0.distcp failed: Connection reset by peer")
if int(os.environ["RANK"]) == 1:
    upload()
'''


def test_item4_termination_message_names_the_workers_error(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_WORKER)
    term = tmp_path / "termination-log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TJ_", "PET_"))}
    env.update({contract.PET_NPROC_PER_NODE: "2", contract.ENV_TERMINATION_MESSAGE_PATH: str(term),
                "OMP_NUM_THREADS": "1"})
    r = subprocess.run([sys.executable, "-m", "trainingjob_trainer.launch", "--standalone", str(script)],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout[-3000:]
    assert "Connection reset by peer" in r.stdout  # the output still reaches the pod's log
    msg = contract.parse_termination_message(term.read_text())
    assert msg.reason == contract.TERM_REASON_ERROR
    assert msg.message.startswith("torchrun exited with 1")
    assert "OSError: S3 upload of epoch_0_train_step_8/__0_0.distcp failed: Connection reset by peer" in msg.message
    assert "ChildFailedError" not in msg.message and "torch/distributed/run.py" not in msg.message, msg.message


def test_item4_cause_lines_drop_torchruns_own_report():
    out = ["[example] step 3/10", "Traceback (most recent call last):", '  File "train.py", line 3',
           "RuntimeError: boom", "W1201 10:00:00.0 1 torch/distributed/elastic/multiprocessing/api.py:1] x",
           "Traceback (most recent call last):", '  File "<frozen runpy>", line 198',
           '  File "/venv/torch/distributed/run.py", line 1032, in <module>',
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", "train.py FAILED"]
    text = launch.cause_lines(out)
    assert text.endswith("RuntimeError: boom") and "FAILED" not in text and "W1201" not in text
    code, msg = launch.decide_exit(torchrun_rc=1, message=None, got_sigterm=False, output_tail=text)
    assert code == 1 and "RuntimeError: boom" in msg.message
    assert len(contract.format_termination_message(
        contract.TerminationMessage(reason="Error", message="x" * 10_000)).encode()) <= 4096
