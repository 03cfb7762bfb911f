"""Version guards: the internals the backends patch are checked at import.

An untested torch or torchsnapshot version fails here, with a message,
instead of saving wrong snapshots.
"""

from __future__ import annotations

from typing import Mapping

import torch

#: The versions whose internals this module patches or builds on, by
#: distribution: torchsnapshot's two stagers are replaced, its read
#: pipeline's ``read_buffer`` is wrapped (:mod:`.ts_stream`) and its manifest
#: module's ``yaml`` reads JSON first (:func:`_ts_install`), its synchronous
#: ``take`` is rebuilt from its private ``_coalesce_path_and_replicated``/
#: ``_take_impl``/``_write_snapshot_metadata`` (:func:`_take_agreed`), DCP's ``FileSystemReader.read_data`` is re-done
#: with parallel GETs (:mod:`.dcp_read`, from its ``storage_data``,
#: ``transforms`` and ``narrow_tensor_by_index``), DCP's ``FsspecWriter`` is subclassed with its
#: private ``_write_data``/``_split_by_size_and_type``/``_item_size``, and
#: torch's private ``_state_dict_utils`` copy the async state. Another version
#: may change any of them without notice, so it fails at import, clearly,
#: instead of saving wrong snapshots. To try one: check those internals,
#: run ``tests/trainer``, then add it here.
TESTED_VERSIONS: dict[str, tuple[str, ...]] = {
    "torch": ("2.13.0",),
    "torchsnapshot-nightly": ("2024.7.26",),
}


def check_versions(installed: Mapping[str, str | None], tested: Mapping[str, tuple[str, ...]] = TESTED_VERSIONS) -> None:
    """Raise ``ImportError`` if an installed distribution has an untested version.

    Args:
        installed: Distribution -> version (``None``: not installed, e.g.
            torchsnapshot in a DCP-only image; its patches then never run).
            A local suffix (``2.13.0+cpu``) is ignored.
        tested: Distribution -> the versions this module was tested with.
    """
    for dist_name, versions in tested.items():
        have = installed.get(dist_name)
        if have is not None and have.split("+", 1)[0] not in versions:
            raise ImportError(
                f"trainingjob_trainer.backends patches internals of {dist_name} and was tested with "
                f"{', '.join(versions)} only; {have} is installed. Install {dist_name}=={versions[-1]} "
                f"(see constraints.txt), or check the patched internals and extend TESTED_VERSIONS")


def installed_versions() -> dict[str, str | None]:
    import importlib.metadata

    out: dict[str, str | None] = {"torch": torch.__version__}
    for name in TESTED_VERSIONS:
        if name != "torch":
            try:
                out[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                out[name] = None
    return out
