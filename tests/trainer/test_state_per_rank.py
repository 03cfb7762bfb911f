"""Issue 8 item 5: per-rank state comes back per rank on both backends and APIs.

DCP keeps one copy of each non-sharded key, so two ranks' dataloader
positions came back as one rank's on both. Two ranks whose loaders stand at
different positions save, then restore into fresh loaders at position 0.
"""

from __future__ import annotations

import json
import pathlib
import traceback

import pytest

from tests.trainer.gang import init_ranks, spawn_ranks
from tests.trainer.test_state_matrix import run_matrix

ROWS = [(b, a) for b in ("torchsnapshot", "dcp") for a in ("tnt", "plain")]
STEPS = 2


class Loader:
    """A stateful loader whose position starts at ``offset`` (different per rank)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.pos = offset

    def __iter__(self):
        import torch

        while self.pos < self.offset + 5:
            self.pos += 1
            yield torch.full((2, 8), float(self.pos))

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, sd):
        self.pos = int(sd["pos"])


def _run_row(*, backend: str, api: str, uri: str, rank: int) -> str | None:
    import torch
    import torch.nn as nn

    def unit_and_loader():
        from tests.trainer.test_state_matrix import _unit_class

        model = nn.Linear(8, 2)
        return _unit_class()(model, torch.optim.AdamW(model.parameters())), Loader(offset=100 * (rank + 1))

    if api == "tnt":
        from torchtnt.framework.train import train as tnt_train

        from trainingjob_trainer.tnt import TorchSnapshotSaver

        unit, loader = unit_and_loader()
        saver = TorchSnapshotSaver(dirpath=uri, backend=backend, save_every_n_train_steps=STEPS,
                                   async_checkpoint=False, watch_preemption=False)
        tnt_train(unit, loader, max_steps=STEPS, callbacks=[saver])
        expected = loader.state_dict()
        unit2, loader2 = unit_and_loader()
        loader2.pos = 0
        # The intra-epoch save holds the loader (the one at the end, "epoch 1", does not).
        TorchSnapshotSaver.restore(saver.snapshotter.store.uri_for(epoch=0, step=STEPS), unit2,
                                   train_dataloader=loader2)
    else:
        from trainingjob_trainer.backends import make_snapshotter
        from trainingjob_trainer.state import PerRankState

        _unit, loader = unit_and_loader()
        for _ in zip(range(STEPS), loader):
            pass
        make_snapshotter(backend=backend, uri=uri, watch_preemption=False,
                         app_state={"loader": PerRankState(loader)}).save(step=STEPS)
        expected = loader.state_dict()
        loader2 = Loader(offset=0)
        if make_snapshotter(backend=backend, uri=uri, watch_preemption=False,
                            app_state={"loader": PerRankState(loader2)}).restore_latest() != STEPS:
            return "nothing restored"
    got = loader2.state_dict()
    return None if got == expected else f"rank {rank}: loader state {got}, saved {expected}"


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    init_ranks(rank, world, port)
    results = {}
    for backend, api in ROWS:
        row = f"{backend}-{api}"
        try:
            results[row] = _run_row(backend=backend, api=api, uri=f"{root}/{row}", rank=rank)
        except Exception:  # noqa: BLE001 - reported per row
            results[row] = traceback.format_exc()[-2000:]
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def results(s3_server, tmp_path_factory):
    return run_matrix(_worker, s3_server=s3_server, out=tmp_path_factory.mktemp("per_rank"), name="per-rank")


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "api"), ROWS, ids=[f"{b}-{a}" for b, a in ROWS])
def test_item5_per_rank_loader_state_survives(results, backend, api):
    for rank, res in results.items():
        assert res[f"{backend}-{api}"] is None, res[f"{backend}-{api}"]
