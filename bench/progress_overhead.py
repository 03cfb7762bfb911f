"""Issue 12: what the progress/request machinery costs the training thread.

Measures, in one process against a moto S3 server:

* ``LiveChannel.on_step`` per call (the only progress work on the training
  thread), over 100k calls;
* a plain-loop ``maybe_save`` with and without the live channel (no
  snapshot due), i.e. the whole step-boundary overhead;
* request latency: from writing the control object to the ack, with
  ``TJ_CONTROL_POLL_SECONDS=0.5`` and 20 ms steps.

Run: ``.venv/bin/python bench/progress_overhead.py`` (~10 s, one process, no torchrun)
"""

from __future__ import annotations

import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import s3fs  # noqa: E402
import torch  # noqa: E402

from tests.trainer.trainer_s3server import start_s3_server  # noqa: E402
from trainingjob_trainer import contract  # noqa: E402
from trainingjob_trainer.backends import make_snapshotter  # noqa: E402
from trainingjob_trainer.progress import LiveChannel  # noqa: E402
from trainingjob_trainer.state import ModelOptimizerState  # noqa: E402


def main() -> None:
    server = start_s3_server()
    try:
        os.environ.update(server.env())
        os.environ[contract.ENV_CONTROL_POLL_SECONDS] = "0.5"
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, key=os.environ["AWS_ACCESS_KEY_ID"],
                               secret=os.environ["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        root = f"s3://{bucket}/job"
        live = LiveChannel(root=root, storage_options=None, attempt=0, progress_seconds=15, poll_seconds=5)
        n = 100_000
        t0 = time.perf_counter()
        for i in range(n):
            live.on_step(step=i, epoch=0, stalled=0.0)
        print(f"LiveChannel.on_step: {(time.perf_counter() - t0) / n * 1e6:.2f} us/call")
        live.close(flush_timeout=5)

        model = torch.nn.Linear(8, 2)
        app = {"train": ModelOptimizerState(model=model, optimizers=[torch.optim.SGD(model.parameters(), lr=0.1)])}
        for label, boundary in (("without live channel", False), ("with live channel", True)):
            snap = make_snapshotter(backend="torchsnapshot", uri=root, app_state=app, watch_preemption=True)
            if not boundary:
                snap._live_boundary = lambda **_: None  # type: ignore[method-assign]
            t0 = time.perf_counter()
            for step in range(1, 20_001):
                snap.maybe_save(step)
            print(f"maybe_save, no snapshot due, {label}: {(time.perf_counter() - t0) / 20_000 * 1e6:.2f} us/step")
            snap.close()

        snap = make_snapshotter(backend="torchsnapshot", uri=root, app_state=app)
        latencies = []
        for k in range(5):
            snap.maybe_save(1)
            req = contract.SnapshotRequest(value=f"bench-{k}", requested_at="")
            t0 = time.monotonic()
            fs.pipe_file(f"{bucket}/job/{contract.SNAPSHOT_REQUEST_OBJECT}", req.to_json().encode())
            step = 1 + k * 1000
            while True:
                step += 1
                time.sleep(0.02)
                snap.maybe_save(step)
                try:
                    ack = contract.SnapshotAck.from_json(fs.cat_file(f"{bucket}/job/{contract.SNAPSHOT_ACK_OBJECT}"))
                except FileNotFoundError:
                    ack = None
                if ack is not None and ack.value == req.value:
                    latencies.append(time.monotonic() - t0)
                    break
        snap.close()
        print("request -> ack (poll 0.5 s, 20 ms steps): " + ", ".join(f"{x:.2f}s" for x in latencies))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
