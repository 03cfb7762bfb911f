"""Names and helpers every backend shares."""

from __future__ import annotations

from typing import Any, Mapping

import torch

BACKEND_TORCHSNAPSHOT = "torchsnapshot"
BACKEND_DCP = "dcp"
#: Chosen from docs/benchmarks.md ("Snapshots"): at 256 MiB and 1 GiB DCP
#: saved faster than torchsnapshot in every run and stalled training least.
#: TorchTNT's ``TorchSnapshotSaver`` keeps torchsnapshot unless told otherwise.
DEFAULT_BACKEND = BACKEND_DCP


def _init_optimizer_states(app_state: Mapping[str, Any]) -> None:
    """Create lazily-initialised optimizer state so it can be loaded in place."""
    from torchtnt.utils.optimizer import init_optim_state

    for value in app_state.values():
        if isinstance(value, torch.optim.Optimizer):
            init_optim_state(value)
