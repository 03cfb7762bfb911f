"""Issue 8 item 13: every random generator a training step may draw from is restored.

torch CPU, numpy's global RNG and Python's ``random`` including ``gauss_next``
(the cached second value of a ``random.gauss`` pair), on both backends and
both APIs: after a restore, each generator draws what it drew right after
the save. Where CUDA is available the same tests draw from CUDA's generator
too (no CUDA here: that part is unverified on this machine).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trainingjob_trainer.backends import make_snapshotter
from trainingjob_trainer.state import RNGState


def _draws() -> dict:
    return {
        "gauss": [random.gauss(0, 1) for _ in range(3)],
        "random": random.random(),
        "np_normal": np.random.normal(size=3).tolist(),
        "np_rand": np.random.rand(2).tolist(),
        "torch": torch.rand(3).tolist(),
        **({"cuda": torch.rand(3, device="cuda").tolist()} if torch.cuda.is_available() else {}),
    }


def _scramble() -> None:
    random.seed(999)
    np.random.seed(999)
    torch.manual_seed(999)
    random.gauss(0, 1)  # leaves a gauss_next behind
    np.random.normal()


def _prime() -> None:
    """Seeded generators with a cached Gaussian pending in Python and numpy."""
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    random.gauss(0, 1)
    np.random.normal()


@pytest.mark.parametrize("backend", ["torchsnapshot", "dcp"])
def test_item13_plain_loop_restores_numpy_python_gauss_and_torch(s3_root, backend):
    _prime()
    make_snapshotter(backend=backend, uri=s3_root, watch_preemption=False, app_state={"rng": RNGState()}).save(step=1)
    expected = _draws()
    _scramble()
    assert make_snapshotter(backend=backend, uri=s3_root, watch_preemption=False,
                            app_state={"rng": RNGState()}).restore_latest() == 1
    assert _draws() == expected


@pytest.mark.parametrize("backend", ["torchsnapshot", "dcp"])
def test_item13_torchtnt_restores_numpy_python_gauss_and_torch(s3_root, backend):
    from torchtnt.framework.train import train as tnt_train

    from tests.trainer.test_state_matrix import _unit_class
    from trainingjob_trainer.tnt import TorchSnapshotSaver

    model = torch.nn.Linear(8, 2)
    unit = _unit_class()(model, torch.optim.AdamW(model.parameters()))
    _prime()
    batches = [torch.ones(2, 8)] * 2  # the steps draw nothing
    tnt_train(unit, batches, max_steps=2,
              callbacks=[TorchSnapshotSaver(dirpath=s3_root, backend=backend, async_checkpoint=False,
                                            watch_preemption=False)])
    expected = _draws()
    _scramble()
    model2 = torch.nn.Linear(8, 2)
    assert TorchSnapshotSaver.restore_from_latest(s3_root, _unit_class()(model2, torch.optim.AdamW(model2.parameters())))
    assert _draws() == expected
