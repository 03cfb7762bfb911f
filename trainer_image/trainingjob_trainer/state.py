"""Stateful wrappers the plain-loop API snapshots: model+optimizers, RNG.

Both backends call ``state_dict()`` to save and ``state_dict()`` then
``load_state_dict()`` to restore, so anything with those two methods can be
put in an ``app_state`` mapping.
"""

from __future__ import annotations

import random
from typing import Any, Iterable

import torch
import torch.nn as nn

from trainingjob_trainer import _dist


def _fsdp_full_state_dict(model: nn.Module) -> bool | None:
    """True/False if ``model`` is FSDP with a FULL/SHARDED type set, else None."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType
    except ImportError:  # pragma: no cover
        return None
    if not any(isinstance(m, FSDP) for m in model.modules()):
        return None
    sdt = FSDP.get_state_dict_type(model).state_dict_type
    return sdt == StateDictType.FULL_STATE_DICT


def _dsd_options(model: nn.Module):
    """``StateDictOptions`` that follow ``model``'s FSDP state-dict type (FULL or not)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=bool(_fsdp_full_state_dict(model)), strict=True)


class ModelOptimizerState:
    """A model and its optimizers, saved with fully-qualified parameter names.

    Uses ``torch.distributed.checkpoint.state_dict`` so that plain modules,
    DDP and FSDP all work, and lazily-created optimizer state (Adam moments)
    is created before loading. For FSDP the state-dict type set with
    ``FSDP.set_state_dict_type`` is respected (FULL saves full tensors,
    SHARDED/LOCAL save shards).

    Args:
        model: The (possibly wrapped) module.
        optimizers: Its optimizers.
    """

    def __init__(self, *, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        self.model = model
        self.optimizers = tuple(optimizers)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizers, options=_dsd_options(self.model))
        return {"model": msd, "optim": osd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model,
            self.optimizers,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=_dsd_options(self.model),
        )


class OptimizerState:
    """One optimizer of ``model``, saved and loaded with ``torch.distributed.checkpoint.state_dict``.

    What TorchTNT's ``FSDPOptimizerWrapper`` is replaced with in this
    package's saves (:mod:`trainingjob_trainer.tnt`). That wrapper calls
    ``FSDP.optim_state_dict``, which with ``use_orig_params=True`` and a FULL
    state-dict type returns an ``exp_avg`` that shares memory with
    ``exp_avg_sq`` (torch 2.13, 2 ranks, AdamW: every parameter), so the
    snapshot held a wrong ``exp_avg``; and its optimizer state is created only
    at the first step, so DCP, which loads only keys the target already has,
    restored nothing. ``get_optimizer_state_dict`` returns the right tensors
    and creates the lazy state before loading.

    Args:
        model: The (possibly FSDP-wrapped) module the optimizer steps.
        optimizer: The optimizer.
    """

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=_dsd_options(self.model))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=_dsd_options(self.model))


class RNGState:
    """This rank's torch CPU and Python ``random`` generator states.

    Keyed by global rank, so a backend that treats identical keys as
    replicated (DCP) still keeps each rank's stream.
    """

    def _key(self) -> str:
        return f"rank{_dist.rank()}"

    def state_dict(self) -> dict[str, Any]:
        version, internal, _gauss = random.getstate()
        py = torch.tensor([version, *internal], dtype=torch.int64)  # fixed shape: loads in place
        return {self._key(): {"torch": torch.get_rng_state(), "python": py}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = state_dict[self._key()]
        torch.set_rng_state(mine["torch"])
        values = [int(v) for v in mine["python"].tolist()]
        random.setstate((values[0], tuple(values[1:]), None))
