"""Stateful wrappers the snapshots hold: model+optimizers, per-rank state, RNG.

Both backends call ``state_dict()`` to save and ``state_dict()`` then
``load_state_dict()`` to restore, so anything with those two methods can be
put in an ``app_state`` mapping.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Iterable

import torch
import torch.nn as nn

from trainingjob_trainer import _dist

logger = logging.getLogger(__name__)


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


def rank_key() -> str:
    """The key of this rank's entry in per-rank state (``rank<global rank>``)."""
    return f"rank{_dist.rank()}"


class PerRankState:
    """Wraps a stateful whose state differs between ranks (a dataloader's position).

    DCP keeps ONE copy of each key that is not a sharded tensor: every rank's
    ``{"pos": 5}`` is taken for a replica of rank 0's, and each rank then gets
    rank 0's back. Under a key of its own rank (as :class:`RNGState`), each
    rank's state survives on both backends. The TorchTNT saver wraps the train
    dataloader with it; wrap any other per-rank state in ``app_state`` too.

    Args:
        stateful: Anything with ``state_dict()`` and ``load_state_dict()``.
    """

    def __init__(self, stateful: Any) -> None:
        self.stateful = stateful

    def state_dict(self) -> dict[str, Any]:
        return {rank_key(): self.stateful.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            mine = state_dict[rank_key()]
        except KeyError:
            raise RuntimeError(
                f"the snapshot holds no per-rank state for {rank_key()} (ranks saved: {sorted(state_dict)}); "
                "was it taken with another world size?"
            ) from None
        self.stateful.load_state_dict(mine)


class RNGState:
    """This rank's random generators: torch CPU, CUDA (when available), numpy, Python.

    Keyed by global rank (:func:`rank_key`), so a backend that treats
    identical keys as replicated (DCP) still keeps each rank's streams. Every
    value is a fixed-shape tensor, so DCP loads it in place. Python's state
    includes ``gauss_next`` (the second value of the last ``random.gauss``
    pair) and numpy's its cached Gaussian, so a resumed run draws the same
    numbers as an uninterrupted one from the first draw on. The CUDA streams of
    every visible device are saved when CUDA is available; a snapshot restored
    without CUDA skips them with a warning.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        mine: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": torch.tensor([version, *internal], dtype=torch.int64),
            "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        }
        np = _numpy()
        if np is not None:
            _name, keys, pos, has_gauss, cached = np.random.get_state()
            mine["numpy"] = torch.from_numpy(keys.astype(np.int64))
            mine["numpy_pos"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
            mine["numpy_gauss"] = torch.tensor([cached], dtype=torch.float64)
        if torch.cuda.is_available():
            mine["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        return {rank_key(): mine}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = state_dict[rank_key()]
        torch.set_rng_state(mine["torch"])
        values = [int(v) for v in mine["python"].tolist()]
        has_gauss, gauss = mine["python_gauss"].tolist() if "python_gauss" in mine else (0.0, 0.0)
        random.setstate((values[0], tuple(values[1:]), gauss if has_gauss else None))
        np = _numpy()
        if np is not None and "numpy" in mine:
            pos, np_has_gauss = (int(v) for v in mine["numpy_pos"].tolist())
            keys = mine["numpy"].numpy().astype(np.uint32)
            np.random.set_state(("MT19937", keys, pos, np_has_gauss, float(mine["numpy_gauss"][0])))
        if "cuda" in mine:
            if torch.cuda.is_available():
                torch.cuda.set_rng_state_all(list(mine["cuda"]))
            else:
                logger.warning("the snapshot holds CUDA RNG states but CUDA is not available; not restored")


def _numpy() -> Any:
    """numpy if installed (its global RNG is saved only then)."""
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torchsnapshot
        return None
    return numpy
