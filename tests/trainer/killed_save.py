"""Subprocess of test_consistency: complete saves, then a save that hangs midway.

Usage: python -m tests.trainer.killed_save URI BACKEND READY_FILE

Saves step 10 and step 20 (complete), trains further, then re-saves step 20;
after two objects of that save are uploaded it creates READY_FILE and hangs,
so the test can SIGKILL it in the middle of the save.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys

from aiobotocore.client import AioBaseClient
import torch

from tests.trainer.trainer_helpers import tiny_model, train_steps
from trainingjob_trainer.backends import make_snapshotter
from trainingjob_trainer.state import ModelOptimizerState, RNGState


def main() -> None:
    uri, backend, ready = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
    model = tiny_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    app = {"train": ModelOptimizerState(model=model, optimizers=[opt]), "rng": RNGState()}
    snap = make_snapshotter(backend=backend, uri=uri, app_state=app, watch_preemption=False)
    train_steps(model, opt, start=1, stop=11)
    snap.save(step=10)
    train_steps(model, opt, start=11, stop=21)
    snap.save(step=20)
    train_steps(model, opt, start=21, stop=26)

    real = AioBaseClient._make_api_call
    puts = {"n": 0}

    async def hanging_api_call(self, operation_name, api_params):
        if operation_name == "PutObject":
            puts["n"] += 1
            if puts["n"] > 2:
                ready.write_text("midway")
                await asyncio.sleep(3600)
        return await real(self, operation_name, api_params)

    AioBaseClient._make_api_call = hanging_api_call
    snap.save(step=20)  # never returns: SIGKILLed by the test
    sys.exit(3)


if __name__ == "__main__":
    main()
