"""The two snapshot backends: torchsnapshot and torch.distributed.checkpoint.

Each implements only the I/O of :class:`~trainingjob_trainer.snapshotter.Snapshotter`
(``_write`` and ``_read``); naming, commit and retention live in the base.
The dependency runs one way: this package imports ``snapshotter``, never the
reverse (a snapshot written by another backend is read through
:meth:`Snapshotter.for_backend`).

Modules: :mod:`.versions` (the version guard, run at import), :mod:`.base`
(backend names), :mod:`.staging` (staging buffers), :mod:`.tsnap`
(torchsnapshot), :mod:`.dcp` (DCP).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from trainingjob_trainer import contract
from trainingjob_trainer.backends import versions
from trainingjob_trainer.backends.base import BACKEND_DCP, BACKEND_TORCHSNAPSHOT, DEFAULT_BACKEND
from trainingjob_trainer.backends.dcp import DCPSnapshotter
from trainingjob_trainer.backends.tsnap import TorchSnapshotSnapshotter
from trainingjob_trainer.snapshotter import Snapshotter, env_int

versions.check_versions(versions.installed_versions())
check_versions = versions.check_versions
TESTED_VERSIONS = versions.TESTED_VERSIONS

__all__ = ["BACKENDS", "BACKEND_DCP", "BACKEND_TORCHSNAPSHOT", "DEFAULT_BACKEND", "DCPSnapshotter",
           "TorchSnapshotSnapshotter", "check_versions", "make_snapshotter", "snapshotter_from_env"]

#: The backends by name (each registered itself with :class:`Snapshotter` too).
BACKENDS: dict[str, type[Snapshotter]] = {
    BACKEND_TORCHSNAPSHOT: TorchSnapshotSnapshotter,
    BACKEND_DCP: DCPSnapshotter,
}


def make_snapshotter(*, backend: str = DEFAULT_BACKEND, **kwargs: Any) -> Snapshotter:
    """A snapshotter of the named backend (``torchsnapshot`` or ``dcp``)."""
    return Snapshotter.for_backend(backend, **kwargs)


def snapshotter_from_env(*, app_state: Mapping[str, Any] | None = None, **overrides: Any) -> Snapshotter:
    """A snapshotter configured by the operator's contract env (``TJ_*``).

    Reads the snapshot URI, backend, every-steps, keep-last, attempt and
    resume-from; ``overrides`` win over the env.

    Raises:
        ValueError: No snapshot URI in the env or the overrides.
    """
    cfg: dict[str, Any] = {
        "uri": os.environ.get(contract.ENV_SNAPSHOT_URI) or None,
        "backend": os.environ.get(contract.ENV_SNAPSHOT_BACKEND) or DEFAULT_BACKEND,
        "every_steps": env_int(contract.ENV_SNAPSHOT_EVERY_STEPS),
        "keep_last": env_int(contract.ENV_SNAPSHOT_KEEP_LAST),
        "attempt": env_int(contract.ENV_ATTEMPT, 0),
        "resume_from": os.environ.get(contract.ENV_RESUME_FROM) or None,
    }
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if not cfg["uri"]:
        raise ValueError(f"no snapshot URI: set ${contract.ENV_SNAPSHOT_URI}")
    return make_snapshotter(app_state=app_state, **cfg)
