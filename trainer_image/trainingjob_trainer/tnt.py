"""A drop-in for TorchTNT 0.2.4's ``TorchSnapshotSaver`` that works on ``s3://``.

Same constructor, ``restore`` and ``restore_from_latest`` as
``torchtnt.framework.callbacks.TorchSnapshotSaver``, so the seed's code runs
unchanged with ``dirpath="s3://bucket/prefix"``. What it fixes and adds:

* ``restore_from_latest`` lists S3 (TorchTNT's reads the local disk) and only
  picks *complete* snapshots (commit marker + matching size/ETag).
* ``async_checkpoint=True`` without a process group saves synchronously
  instead of crashing in torchsnapshot's ``dist_store``.
* The endpoint/credentials reach every layer (our ``tjs3`` plugin).
* ``backend="dcp"`` switches to torch.distributed.checkpoint.
* On attempt > 0 (contract env) it restores before the first step if the
  script did not; on SIGTERM all ranks take an emergency snapshot at the
  next step boundary and exit with the contract's preempted code.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterable, List, Optional

import torch.distributed as dist
from torchtnt.framework.callback import Callback
from torchtnt.framework.callbacks._checkpoint_utils import (
    _prepare_app_state_for_checkpoint,
    _prepare_app_state_for_restore,
    _TRAIN_DL_STATE_KEY,
)
from torchtnt.framework.callbacks.checkpointer_types import RestoreOptions
from torchtnt.framework.state import State
from torchtnt.framework.unit import AppStateMixin, TTrainUnit

from trainingjob_trainer import _dist, contract
from trainingjob_trainer.backends import BACKEND_TORCHSNAPSHOT, make_snapshotter
from trainingjob_trainer.snapshotter import Snapshotter, env_int
from trainingjob_trainer.state import RNGState

logger = logging.getLogger(__name__)

_RNG_STATE_KEY = "rng_state"


def _rng_stateful(backend: str) -> Any:
    if backend == BACKEND_TORCHSNAPSHOT:
        import torchsnapshot

        return torchsnapshot.RNGState()  # what TorchTNT's saver stores (per rank)
    return RNGState()  # DCP: keyed by rank


def _restore_app_state(
    unit: AppStateMixin, restore_options: RestoreOptions | None, train_dataloader: Any, rng: Any
) -> Dict[str, Any]:
    app_state = _prepare_app_state_for_restore(unit, restore_options or RestoreOptions())
    app_state[_RNG_STATE_KEY] = rng
    if train_dataloader is not None and hasattr(train_dataloader, "load_state_dict"):
        app_state[_TRAIN_DL_STATE_KEY] = train_dataloader
    return app_state


class TorchSnapshotSaver(Callback):
    """Periodic, crash-consistent snapshots of a TorchTNT unit to S3.

    Args:
        dirpath: The job's snapshot folder (``s3://...`` or a local path).
        save_every_n_train_steps: Save every N train steps (``None``: never).
        save_every_n_epochs: Save every N epochs (``None``: never).
        keep_last_n_checkpoints: Complete snapshots to keep (``None``: all).
        process_group: Process group of the saves (default: world).
        async_checkpoint: Save in the background (needs a process group).
        replicated: torchsnapshot replicated globs.
        storage_options: s3fs options over the contract env.
        backend: ``torchsnapshot`` (default) or ``dcp``.
        watch_preemption: Take the coordinated emergency snapshot on SIGTERM.
        save_every_n_eval_epochs: Not supported (must be ``None``).
        best_checkpoint_config: Not supported (must be ``None``).
        knob_options: Accepted for compatibility; unused.
    """

    def __init__(
        self,
        dirpath: str,
        *,
        save_every_n_train_steps: Optional[int] = None,
        save_every_n_epochs: Optional[int] = None,
        save_every_n_eval_epochs: Optional[int] = None,
        keep_last_n_checkpoints: Optional[int] = None,
        best_checkpoint_config: Any = None,
        process_group: Optional[dist.ProcessGroup] = None,
        async_checkpoint: bool = True,
        replicated: Optional[List[str]] = None,
        storage_options: Optional[Dict[str, Any]] = None,
        knob_options: Any = None,  # noqa: ARG002
        backend: str = BACKEND_TORCHSNAPSHOT,
        watch_preemption: bool = True,
    ) -> None:
        if save_every_n_eval_epochs is not None or best_checkpoint_config is not None:
            raise ValueError("save_every_n_eval_epochs and best_checkpoint_config are not supported")
        if save_every_n_epochs is not None and save_every_n_epochs <= 0:
            raise ValueError(f"save_every_n_epochs must be positive, got {save_every_n_epochs}")
        extra = {"replicated": replicated} if backend == BACKEND_TORCHSNAPSHOT else {}
        self._snap: Snapshotter = make_snapshotter(
            backend=backend,
            uri=dirpath,
            every_steps=save_every_n_train_steps,
            keep_last=keep_last_n_checkpoints,
            storage_options=storage_options,
            attempt=env_int(contract.ENV_ATTEMPT, 0) or 0,
            resume_from=os.environ.get(contract.ENV_RESUME_FROM) or None,
            process_group=process_group,
            async_save=async_checkpoint,
            watch_preemption=watch_preemption,
            **extra,
        )
        self._backend = backend
        self._save_every_n_epochs = save_every_n_epochs
        self._storage_options = storage_options

    @property
    def dirpath(self) -> str:
        """The snapshot folder."""
        return self._snap.uri

    @property
    def snapshotter(self) -> Snapshotter:
        """The underlying plain-loop snapshotter."""
        return self._snap

    # ------------------------------------------------------------------ hooks
    def _app_state(self, state: State, unit: AppStateMixin, *, intra_epoch: bool) -> Dict[str, Any]:
        app_state = _prepare_app_state_for_checkpoint(state, unit, intra_epoch)
        app_state[_RNG_STATE_KEY] = _rng_stateful(self._backend)
        return app_state

    def on_train_start(self, state: State, unit: TTrainUnit) -> None:
        if getattr(unit, "_tj_restored_from", None) is None and (env_int(contract.ENV_ATTEMPT, 0) or 0) > 0:
            target = self._snap.restore_latest(
                app_state=_restore_app_state(unit, None, state.train_state.dataloader if state.train_state else None,
                                             _rng_stateful(self._backend)),
                optional=(_TRAIN_DL_STATE_KEY,),
            )
            if target:
                unit._tj_restored_from = self._snap.restored_from  # type: ignore[attr-defined]
        self._snap.restored_from = self._snap.restored_from or getattr(unit, "_tj_restored_from", None)

    def _save(self, state: State, unit: TTrainUnit, *, intra_epoch: bool) -> None:
        epoch = unit.train_progress.num_epochs_completed
        step = unit.train_progress.num_steps_completed
        if self._snap.last_marker is not None and (self._snap.last_marker.epoch, self._snap.last_marker.step) == (epoch, step):
            return
        if self._snap._in_flight is not None and (self._snap._in_flight.epoch, self._snap._in_flight.step) == (epoch, step):
            return
        self._snap.save(step=step, epoch=epoch, app_state=self._app_state(state, unit, intra_epoch=intra_epoch))

    def on_train_step_end(self, state: State, unit: TTrainUnit) -> None:
        step = unit.train_progress.num_steps_completed
        if self._snap.step_boundary():
            self._snap.emergency_save(
                step=step,
                epoch=unit.train_progress.num_epochs_completed,
                app_state=self._app_state(state, unit, intra_epoch=True),
            )
        every = self._snap.every_steps
        if every and step % every == 0:
            self._save(state, unit, intra_epoch=True)

    def on_train_epoch_end(self, state: State, unit: TTrainUnit) -> None:
        epoch = unit.train_progress.num_epochs_completed
        if self._save_every_n_epochs and epoch % self._save_every_n_epochs == 0:
            self._save(state, unit, intra_epoch=False)

    def on_train_end(self, state: State, unit: TTrainUnit) -> None:
        self._save(state, unit, intra_epoch=False)
        self._snap.close()

    def on_exception(self, state: State, unit: Any, exc: BaseException) -> None:  # noqa: ARG002
        try:
            self._snap.wait()
        except Exception:  # noqa: BLE001 - never mask the original error
            logger.exception("pending snapshot failed during exception handling")

    # ---------------------------------------------------------------- restore
    @staticmethod
    def restore(
        path: str,
        unit: AppStateMixin,
        *,
        train_dataloader: Optional[Iterable[Any]] = None,
        process_group: Optional[dist.ProcessGroup] = None,
        restore_options: Optional[RestoreOptions] = None,
        storage_options: Optional[Dict[str, Any]] = None,
        backend: Optional[str] = None,
        **_: Any,
    ) -> None:
        """Restore one complete snapshot folder into ``unit`` (and the dataloader)."""
        root, _, _name = path.rstrip("/").rpartition("/")
        probe = make_snapshotter(backend=BACKEND_TORCHSNAPSHOT, uri=root, storage_options=storage_options,
                                 process_group=process_group, watch_preemption=False)


        def written_by() -> str | None:
            info = probe.store.inspect(path)
            return info.marker.backend if info and info.marker else None

        chosen = backend or probe._retried(
            lambda: _dist.on_rank0(written_by, pg=probe._flag_pg, what=f"reading the marker of {path}"),
            what=f"reading the marker of {path}") or BACKEND_TORCHSNAPSHOT
        snap = make_snapshotter(backend=chosen, uri=root, storage_options=storage_options,
                                process_group=process_group, watch_preemption=False)
        snap.restore(path, app_state=_restore_app_state(unit, restore_options, train_dataloader, _rng_stateful(chosen)),
                     optional=(_TRAIN_DL_STATE_KEY,))
        unit._tj_restored_from = path.rstrip("/")  # type: ignore[attr-defined]

    @classmethod
    def restore_from_latest(
        cls,
        dirpath: str,
        unit: AppStateMixin,
        *,
        train_dataloader: Optional[Iterable[Any]] = None,
        process_group: Optional[dist.ProcessGroup] = None,
        restore_options: Optional[RestoreOptions] = None,
        storage_options: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> bool:
        """Restore the latest COMPLETE snapshot under ``dirpath`` (S3 or local).

        The contract's explicit ``TJ_RESUME_FROM`` wins when set.

        Returns:
            True if a snapshot was restored.
        """
        probe = make_snapshotter(backend=BACKEND_TORCHSNAPSHOT, uri=dirpath, storage_options=storage_options,
                                 process_group=process_group, watch_preemption=False,
                                 resume_from=os.environ.get(contract.ENV_RESUME_FROM) or None)
        target = probe.restore_target()  # rank 0 lists, retried; every rank gets the answer or the error
        if target is None:
            logger.info("no complete snapshot under %s", dirpath)
            return False
        cls.restore(target, unit, train_dataloader=train_dataloader, process_group=process_group,
                    restore_options=restore_options, storage_options=storage_options, **kwargs)
        return True
