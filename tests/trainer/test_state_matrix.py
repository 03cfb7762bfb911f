"""Issue 8 items 2 and 14: restore produces the saved optimizer state, for every combination.

One table: plain module, DDP, FSDP (``use_orig_params=True``, FULL and
SHARDED state-dict types) x torchsnapshot and DCP x TorchTNT's
``TorchSnapshotSaver`` and the plain-loop API, each with AdamW (whose
``exp_avg`` and ``exp_avg_sq`` differ, so a state that aliases one to the
other shows). Two ranks in ONE spawned process group run the whole table; each
row trains 3 steps, saves, restores into a freshly built model and optimizer
(other initial weights, no optimizer state) and compares every tensor of the
full model and optimizer state (``get_state_dict(full_state_dict=True)``,
which gathers FSDP shards) with ``torch.equal``.
"""

from __future__ import annotations

import json
import pathlib
import traceback

import pytest

from tests.trainer.gang import init_ranks, spawn_ranks

WRAPS = ("none", "ddp", "fsdp-full", "fsdp-sharded")
BACKENDS = ("torchsnapshot", "dcp")
APIS = ("tnt", "plain")
ROWS = [(w, b, a) for w in WRAPS for b in BACKENDS for a in APIS]
STEPS = 3


def _build(wrap: str, seed: int):
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    model: nn.Module = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model)
    elif wrap.startswith("fsdp"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType

        model = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
        sdt = StateDictType.FULL_STATE_DICT if wrap == "fsdp-full" else StateDictType.SHARDED_STATE_DICT
        FSDP.set_state_dict_type(model, sdt)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _batches():
    import torch

    return [torch.randn(4, 8, generator=torch.Generator().manual_seed(100 + i)) for i in range(STEPS)]


def _step(model, opt, x) -> None:
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _full_state(model, opt) -> dict:
    """The full model and optimizer state, cloned (collective for FSDP)."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from tests.trainer.trainer_helpers import flat_tensors

    msd, osd = get_state_dict(model, [opt], options=StateDictOptions(full_state_dict=True))
    flat = flat_tensors({"model": msd, "optim": osd})
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in flat.items()}


def _unit_class():
    from torchtnt.framework.unit import TrainUnit

    class Unit(TrainUnit):
        def __init__(self, model, opt) -> None:
            super().__init__()
            self.module = model
            self.optimizer = opt

        def train_step(self, state, data) -> None:
            _step(self.module, self.optimizer, data)

    return Unit


def _run_row(*, wrap: str, backend: str, api: str, uri: str) -> str | None:
    """Save and restore one row; ``None`` if the state came back, else what differs."""
    import torch

    model, opt = _build(wrap, seed=0)
    if api == "tnt":
        from torchtnt.framework.train import train as tnt_train

        from trainingjob_trainer.tnt import TorchSnapshotSaver

        unit = _unit_class()(model, opt)
        saver = TorchSnapshotSaver(dirpath=uri, backend=backend, async_checkpoint=False, watch_preemption=False)
        tnt_train(unit, _batches(), max_steps=STEPS, callbacks=[saver])  # on_train_end saves step 3
        expected = _full_state(model, opt)
        model2, opt2 = _build(wrap, seed=1)
        unit2 = _unit_class()(model2, opt2)
        if not TorchSnapshotSaver.restore_from_latest(uri, unit2):
            return "nothing restored"
    else:
        from trainingjob_trainer.backends import make_snapshotter
        from trainingjob_trainer.state import ModelOptimizerState

        for x in _batches():
            _step(model, opt, x)
        snap = make_snapshotter(backend=backend, uri=uri, watch_preemption=False,
                                app_state={"train": ModelOptimizerState(model=model, optimizers=[opt])})
        snap.save(step=STEPS)
        expected = _full_state(model, opt)
        model2, opt2 = _build(wrap, seed=1)
        snap2 = make_snapshotter(backend=backend, uri=uri, watch_preemption=False,
                                 app_state={"train": ModelOptimizerState(model=model2, optimizers=[opt2])})
        if snap2.restore_latest() != STEPS:
            return "nothing restored"
    got = _full_state(model2, opt2)
    if not any(k.endswith("/exp_avg") for k in expected):
        return f"no Adam state in the saved run: {sorted(expected)}"
    if got.keys() != expected.keys():
        return f"keys differ: missing {sorted(expected.keys() - got.keys())}, extra {sorted(got.keys() - expected.keys())}"
    bad = sorted(k for k in expected if isinstance(expected[k], torch.Tensor) and not torch.equal(expected[k], got[k]))
    return f"tensors differ: {bad}" if bad else None


def _matrix_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    init_ranks(rank, world, port)
    results = {}
    for wrap, backend, api in ROWS:
        row = f"{wrap}-{backend}-{api}"
        try:
            results[row] = _run_row(wrap=wrap, backend=backend, api=api, uri=f"{root}/{row}")
        except Exception:  # noqa: BLE001 - reported per row
            results[row] = traceback.format_exc()[-2000:]
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def new_root(s3_server, *, name: str) -> str:
    """A job snapshot root named ``name`` in a new bucket of ``s3_server``."""
    import uuid

    import s3fs

    env = s3_server.env()
    bucket = f"tj-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                      secret=env["AWS_SECRET_ACCESS_KEY"]).mkdir(bucket)
    return f"s3://{bucket}/snapshots/default/{name}"


def run_matrix(worker, *, s3_server, out: pathlib.Path, name: str, root: str | None = None,
               env: dict[str, str] | None = None) -> dict:
    """Run ``worker(rank, world, port, root, out)`` on 2 ranks.

    Args:
        worker: An importable (module-level) function.
        s3_server: The test S3 server; its env is set for the ranks.
        out: Where each rank writes ``rank<R>.json``.
        name: The job name of a new root (``root`` not given).
        root: The snapshot root (default: :func:`new_root`).
        env: More env for the ranks (e.g. poll intervals).

    Returns:
        rank -> row -> ``None`` (passed) or what failed, as each rank wrote it.
    """
    import os

    env = {**s3_server.env(), **(env or {})}
    root = root or new_root(s3_server, name=name)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the spawned ranks inherit it
    try:
        spawn_ranks(worker, root, str(out), timeout=400)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(2)}


@pytest.fixture(scope="module")
def matrix(s3_server, tmp_path_factory):
    """Run the whole table once (2 ranks); rank -> row -> failure or None."""
    return run_matrix(_matrix_worker, s3_server=s3_server, out=tmp_path_factory.mktemp("matrix"), name="matrix")


@pytest.mark.slow
@pytest.mark.timeout(500)
@pytest.mark.parametrize(("wrap", "backend", "api"), ROWS, ids=[f"{w}-{b}-{a}" for w, b, a in ROWS])
def test_item2_item14_restore_produces_saved_optimizer_state(matrix, wrap, backend, api):
    row = f"{wrap}-{backend}-{api}"
    for rank, results in matrix.items():
        assert results[row] is None, f"rank {rank}, {row}: {results[row]}"
