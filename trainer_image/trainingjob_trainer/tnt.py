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
* Unset keyword arguments come from the contract env (backend, every-steps,
  keep-last), then TorchTNT's defaults.
* On attempt > 0, or when the contract names a snapshot to resume from, it
  restores before the first step if the script did not; on SIGTERM (in a
  train or an eval step) all ranks take an emergency snapshot at the next
  step boundary and exit with the contract's preempted code.
* Every train step's number goes to the launcher's progress file.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterable, List, Optional

import torch.distributed as dist
import torchtnt

from torchtnt.framework.callback import Callback
from torchtnt.framework.callbacks._checkpoint_utils import (
    _prepare_app_state_for_checkpoint,
    _prepare_app_state_for_restore,
    _TRAIN_DL_STATE_KEY,
)
from torchtnt.framework.callbacks.checkpointer_types import RestoreOptions
from torchtnt.framework.state import EntryPoint, State
from torchtnt.framework.unit import AppStateMixin, TTrainUnit
from torchtnt.utils.prepare_module import FSDPOptimizerWrapper

from trainingjob_trainer import _dist, contract
from trainingjob_trainer.backends import BACKEND_TORCHSNAPSHOT, make_snapshotter, snapshotter_from_env
from trainingjob_trainer.progress import tnt_total_steps
from trainingjob_trainer.snapshotter import Snapshotter, record_progress
from trainingjob_trainer.state import OptimizerState, PerRankState, RNGState

logger = logging.getLogger(__name__)


def _check_torchtnt_version(version: str) -> None:
    """This module uses TorchTNT internals (``_checkpoint_utils``, the
    ``FSDPOptimizerWrapper`` layout, ``Progress`` counters) as of 0.2.4; any
    other version must fail here, with a message, never misbehave later.

    Raises:
        ImportError: ``version`` is not one this module was written against.
    """
    if version not in SUPPORTED_TORCHTNT:
        raise ImportError(
            f"trainingjob_trainer.tnt supports torchtnt {', '.join(sorted(SUPPORTED_TORCHTNT))}, found {version}: "
            "it relies on TorchTNT internals; install a supported torchtnt (see constraints.txt)"
        )


#: TorchTNT versions whose internals this module was checked against.
SUPPORTED_TORCHTNT = frozenset({"0.2.4"})
_check_torchtnt_version(torchtnt.__version__)

_RNG_STATE_KEY = "rng_state"


def _snapshot_entries(app_state: Dict[str, Any]) -> Dict[str, Any]:
    """TorchTNT's app state as this package snapshots it (saves and restores alike).

    * ``FSDPOptimizerWrapper`` entries become :class:`OptimizerState`: the
      wrapper's ``FSDP.optim_state_dict`` stores a wrong ``exp_avg`` with
      ``use_orig_params=True`` (FULL), and DCP restored no optimizer state
      through it (issue 8, items 2 and 14; see :class:`OptimizerState`).
    * The train dataloader is keyed by rank (:class:`PerRankState`): DCP
      keeps one copy of a non-sharded key, so every rank came back with one
      rank's position (item 5).
    * :class:`RNGState` is added: this rank's torch, CUDA, numpy and Python
      generators, keyed by rank (TorchTNT's saver stores torch's CPU
      generator only; item 13).
    """
    out: Dict[str, Any] = {}
    for key, value in app_state.items():
        if isinstance(value, FSDPOptimizerWrapper):
            value = OptimizerState(model=value.module, optimizer=value.optimizer)
        elif key == _TRAIN_DL_STATE_KEY:
            value = PerRankState(value)
        out[key] = value
    out[_RNG_STATE_KEY] = RNGState()
    return out


def _restore_app_state(
    unit: AppStateMixin, restore_options: RestoreOptions | None, train_dataloader: Any
) -> Dict[str, Any]:
    app_state = _prepare_app_state_for_restore(unit, restore_options or RestoreOptions())
    if train_dataloader is not None and hasattr(train_dataloader, "load_state_dict"):
        app_state[_TRAIN_DL_STATE_KEY] = train_dataloader
    return _snapshot_entries(app_state)


class TorchSnapshotSaver(Callback):
    """Periodic, crash-consistent snapshots of a TorchTNT unit to S3.

    Args:
        dirpath: The job's snapshot folder (``s3://...`` or a local path).
        save_every_n_train_steps: Save every N train steps (``None``:
            ``$TJ_SNAPSHOT_EVERY_STEPS``, else never).
        save_every_n_epochs: Save every N epochs (``None``: never).
        keep_last_n_checkpoints: Complete snapshots to keep (``None``:
            ``$TJ_SNAPSHOT_KEEP_LAST``, else all).
        process_group: Process group of the saves (default: world).
        async_checkpoint: Save in the background (needs a process group).
        replicated: torchsnapshot replicated globs.
        storage_options: s3fs options over the contract env.
        backend: ``torchsnapshot`` or ``dcp`` (``None``: ``$TJ_SNAPSHOT_BACKEND``,
            else ``torchsnapshot``).
        watch_preemption: Take the coordinated emergency snapshot on SIGTERM
            (and serve snapshot requests, which ride the same flag).
        total_steps: The run's total train steps for the progress object
            (``None``: from the loop's ``max_steps``/``max_epochs``).
        save_every_n_eval_epochs: Under ``fit()``, save every N eval epochs
            (the train state, named by its train epoch and step; under
            ``evaluate()`` alone there is no train state and nothing is saved).
        best_checkpoint_config: Not supported (must be ``None``): the
            contract's folder names carry no metric (docs/trainer.md).
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
        backend: Optional[str] = None,
        watch_preemption: bool = True,
        total_steps: Optional[int] = None,
    ) -> None:
        if best_checkpoint_config is not None:
            raise ValueError("best_checkpoint_config is not supported: snapshot folder names carry no metric")
        for name, every in (("save_every_n_epochs", save_every_n_epochs),
                            ("save_every_n_eval_epochs", save_every_n_eval_epochs)):
            if every is not None and every <= 0:
                raise ValueError(f"{name} must be positive, got {every}")
        # Explicit keyword arguments win, then the contract env (what the
        # TrainingJob says: backend, everySteps, keepLast, resumeFrom, the
        # attempt), then TorchTNT's defaults (torchsnapshot, keep all).
        backend = backend or os.environ.get(contract.ENV_SNAPSHOT_BACKEND) or BACKEND_TORCHSNAPSHOT
        extra = {"replicated": replicated} if backend == BACKEND_TORCHSNAPSHOT else {}
        self._snap: Snapshotter = snapshotter_from_env(
            backend=backend,
            uri=dirpath,
            every_steps=save_every_n_train_steps,
            keep_last=keep_last_n_checkpoints,
            storage_options=storage_options,
            process_group=process_group,
            async_save=async_checkpoint,
            watch_preemption=watch_preemption,
            total_steps=total_steps,
            **extra,
        )
        self._save_every_n_epochs = save_every_n_epochs
        self._save_every_n_eval_epochs = save_every_n_eval_epochs

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
        return _snapshot_entries(_prepare_app_state_for_checkpoint(state, unit, intra_epoch))

    def on_train_start(self, state: State, unit: TTrainUnit) -> None:
        # Restore unless the script did: on a restarted gang (attempt > 0), or
        # when the TrainingJob names a snapshot (spec.snapshot.resumeFrom),
        # on attempt 0 too.
        if getattr(unit, "_tj_restored_from", None) is None and (self._snap.attempt > 0 or self._snap.resume_from):
            target = self._snap.restore_latest(
                app_state=_restore_app_state(unit, None, state.train_state.dataloader if state.train_state else None),
                optional=(_TRAIN_DL_STATE_KEY,),
            )
            if target:
                unit._tj_restored_from = self._snap.restored_from  # type: ignore[attr-defined]
        self._snap.restored_from = self._snap.restored_from or getattr(unit, "_tj_restored_from", None)
        ts = state.train_state
        if self._snap.total_steps is None and ts is not None:
            self._snap.total_steps = tnt_total_steps(max_steps=ts.max_steps, max_epochs=ts.max_epochs,
                                                     max_steps_per_epoch=ts.max_steps_per_epoch, dataloader=ts.dataloader)

    def _save(self, state: State, unit: TTrainUnit, *, intra_epoch: bool) -> None:
        epoch = unit.train_progress.num_epochs_completed
        step = unit.train_progress.num_steps_completed
        if self._snap.last_marker is not None and (self._snap.last_marker.epoch, self._snap.last_marker.step) == (epoch, step):
            return
        if self._snap._in_flight is not None and (self._snap._in_flight.epoch, self._snap._in_flight.step) == (epoch, step):
            return
        self._snap.save(step=step, epoch=epoch, app_state=self._app_state(state, unit, intra_epoch=intra_epoch))

    def _check_preemption(self, state: State, unit: TTrainUnit) -> None:
        """Step boundary: if any rank got SIGTERM, emergency snapshot and :class:`Preempted`."""
        # step_boundary() also commits a finished async save without a watcher (item 6).
        if self._snap.step_boundary():
            self._emergency(state, unit)

    def _emergency(self, state: State, unit: TTrainUnit) -> None:
        progress = unit.train_progress
        self._snap.emergency_save(
            step=progress.num_steps_completed,
            epoch=progress.num_epochs_completed,
            # Mid-epoch (also an eval within the epoch): with the train dataloader's position.
            app_state=self._app_state(state, unit, intra_epoch=progress.num_steps_completed_in_epoch > 0),
        )

    def on_train_step_end(self, state: State, unit: TTrainUnit) -> None:
        step = unit.train_progress.num_steps_completed
        record_progress(step)  # the step reached, for the launcher's termination message
        self._snap._live_boundary(step=step, epoch=unit.train_progress.num_epochs_completed)
        self._check_preemption(state, unit)
        every = self._snap.every_steps
        if (every and step % every == 0) or self._snap.request_due():
            self._save(state, unit, intra_epoch=True)
            if self._snap.hold_if_requested():
                self._emergency(state, unit)

    def on_eval_step_end(self, state: State, unit: Any) -> None:
        """Under ``fit()`` an eval step is a step boundary too (issue 8, item 12):
        a SIGTERM during a long eval epoch gets its emergency snapshot (of the
        train state; the interrupted eval is not resumed). Every rank must run
        the same number of eval steps, as with train steps."""
        if state.entry_point == EntryPoint.FIT:
            self._check_preemption(state, unit)

    def on_eval_epoch_end(self, state: State, unit: Any) -> None:
        every = self._save_every_n_eval_epochs
        if every and state.entry_point == EntryPoint.FIT and unit.eval_progress.num_epochs_completed % every == 0:
            self._save(state, unit, intra_epoch=unit.train_progress.num_steps_completed_in_epoch > 0)

    def on_train_epoch_end(self, state: State, unit: TTrainUnit) -> None:
        epoch = unit.train_progress.num_epochs_completed
        if self._save_every_n_epochs and epoch % self._save_every_n_epochs == 0:
            self._save(state, unit, intra_epoch=False)

    def on_train_end(self, state: State, unit: TTrainUnit) -> None:
        self._save(state, unit, intra_epoch=False)
        self._snap.close()

    def on_exception(self, state: State, unit: Any, exc: BaseException) -> None:  # noqa: ARG002
        """Local cleanup only (:meth:`Snapshotter.abandon`): no collective, since
        the other ranks are not where this one is (issue 8, item 7)."""
        self._snap.abandon()

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
        # With a watcher of its own while it runs: a SIGTERM during the
        # restore exits at once (PreemptedDuringRestore).
        snap = make_snapshotter(backend=chosen, uri=root, storage_options=storage_options,
                                process_group=process_group)
        app_state = _restore_app_state(unit, restore_options, train_dataloader)
        # strict=False (TorchTNT's RestoreOptions): restore the entries the snapshot has, skip the others.
        optional = (_TRAIN_DL_STATE_KEY,) if restore_options is None or restore_options.strict else tuple(app_state)
        try:
            snap.restore(path, app_state=app_state, optional=optional)
        finally:
            if snap.watcher is not None:
                snap.watcher.uninstall()
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
