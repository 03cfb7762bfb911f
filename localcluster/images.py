"""``python -m localcluster.images build``: the project's two images, built here with podman.

No image registry is reachable from this machine, so the public bases the
Dockerfiles name (``python:3.11-slim``, ``pytorch/pytorch``) cannot be pulled.
This module makes local equivalents and builds the *unchanged* Dockerfiles on
them, passing the base as the build argument the Dockerfiles already take:

* ``localhost/tj-base-python``: Debian bookworm made by ``debootstrap
  --variant=minbase`` (python3, python3-venv, ca-certificates), imported with
  ``podman import``; ``python`` is python3, as in the official python image.
  It stands in for ``python:3.11.x-slim-bookworm`` (``PYTHON_IMAGE``).
* ``localhost/tj-base-torch``: that base plus a venv at ``/opt/venv`` (first
  on PATH) holding the CPU torch wheel pinned in ``constraints.txt``. It stands
  in for ``pytorch/pytorch`` (``BASE_IMAGE``): a ``python`` with pip and torch.
* ``localhost/trainingjob-operator`` from ``operator/Dockerfile`` and
  ``localhost/trainingjob-trainer`` from ``trainer_image/Dockerfile``.

Every image is tagged with a hash of its inputs (recipe, base tag, the
Dockerfile, and the files its ``COPY`` lines name), so a second run whose
inputs did not change only checks ``podman image exists`` (seconds). The
build context is a staged copy of exactly those files (no ``.venv``, no
``__pycache__``). The references are written to :data:`IMAGES_FILE` for the
tests and the demo.

pip inside a build reaches the package registries only with this machine's CA
bundle, and the torch wheel lies in a local folder: both are taken from the
host's pip config (``cert``, ``find-links``) and mounted read-only for the
build's RUN steps only, with a generated ``/etc/pip.conf``; nothing of them is
left in an image. Builds take the heavy lock ``/tmp/tj-heavy.lock`` (a cached
run does not).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
IMAGES_FILE = ROOT / ".localcluster" / "images.json"
HEAVY_LOCK = Path("/tmp/tj-heavy.lock")
DEBIAN_SUITE = "bookworm"
DEBIAN_INCLUDE = ("python3", "python3-venv", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Inside a build's RUN steps only (mounted, never copied into a layer).
BUILD_CA = "/etc/localcluster-build/ca.crt"
BUILD_PIP_CONF = "/etc/pip.conf"
#: Bumped when the local recipe of a base changes in a way its inputs do not show.
RECIPE_VERSION = "1"
TORCH_BASE_CONTAINERFILE = """\
ARG BASE
FROM ${BASE}
ARG TORCH_REQUIREMENT
RUN python -m venv /opt/venv \\
 && /opt/venv/bin/pip install --no-cache-dir "${TORCH_REQUIREMENT}" \\
 && /opt/venv/bin/python -c "import torch; print(torch.__version__)"
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
"""
SKIP_NAMES = {"__pycache__", ".pytest_cache"}
SKIP_SUFFIXES = (".pyc", ".egg-info")


@dataclass(frozen=True)
class ProductImage:
    """One of the project's own images: its Dockerfile and the build argument naming its base."""

    key: str
    repository: str
    dockerfile: str
    base_arg: str
    base_key: str


PRODUCT_IMAGES = (
    ProductImage("operator", "localhost/trainingjob-operator", "operator/Dockerfile", "PYTHON_IMAGE", "python"),
    ProductImage("trainer", "localhost/trainingjob-trainer", "trainer_image/Dockerfile", "BASE_IMAGE", "torch"),
)


def _log(msg: str) -> None:
    print(f"images: {msg}", flush=True)


def podman(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS`` (containers.conf supplies runtime and ulimits, see tools.py)."""
    return subprocess.run(["podman", *args], check=check, text=True,
                          capture_output=capture, stdin=subprocess.DEVNULL)


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


# ---------------------------------------------------------------------------
# Inputs and their hashes
# ---------------------------------------------------------------------------
def _skip(path: Path) -> bool:
    return any(part in SKIP_NAMES or part.endswith(SKIP_SUFFIXES) for part in path.parts)


def context_files(*, sources: list[str]) -> list[Path]:
    """The files (relative to the repository root) under ``sources``, sorted, build junk left out."""
    out: list[Path] = []
    for src in sources:
        path = ROOT / src
        if path.is_dir():
            out += [p.relative_to(ROOT) for p in path.rglob("*") if p.is_file() and not _skip(p.relative_to(ROOT))]
        elif path.is_file():
            out.append(Path(src))
        else:
            raise SystemExit(f"COPY source {src} does not exist in {ROOT}")
    return sorted(set(out))


def copy_sources(*, dockerfile: Path) -> list[str]:
    """The build-context paths a Dockerfile's ``COPY`` lines read (``--from`` copies excluded)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    sources: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0].upper() == "COPY" and not any(w.startswith("--from") for w in words):
            sources += [w.rstrip("/") for w in words[1:-1] if not w.startswith("--")]
    return sources


def digest(*, parts: Sequence[str | bytes], files: Sequence[Path] = ()) -> str:
    """sha256 over ``parts`` and the names and contents of ``files`` (relative to the root); 12 hex digits."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big") + data)
    for rel in files:
        h.update(str(rel).encode() + b"\0" + (ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()[:12]


def torch_requirement() -> str:
    """The torch pin of ``constraints.txt`` (the CPU build on this machine's disk)."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip().startswith("torch=="):
            return line.strip()
    raise SystemExit("constraints.txt pins no torch==")


# ---------------------------------------------------------------------------
# The host's pip settings, for pip inside a build
# ---------------------------------------------------------------------------
def host_pip_settings() -> dict[str, str]:
    """``cert`` and the first ``find-links`` folder of the host's pip config (env wins), if any."""
    found: dict[str, str] = {}
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in ("cert", "find-links") and name not in found:
            found[name] = value.strip().strip("'\"").split()[0]
    for env, name in (("PIP_CERT", "cert"), ("PIP_FIND_LINKS", "find-links")):
        if os.environ.get(env):
            found[name] = os.environ[env].split()[0]
    return {k: v for k, v in found.items() if Path(v).exists()}


def build_mounts(*, tmp: Path) -> list[str]:
    """``podman build`` flags mounting the CA bundle, the wheel folder and a pip.conf naming them."""
    settings = host_pip_settings()
    conf = ["[global]", "disable-pip-version-check = true"]
    flags: list[str] = []
    if "cert" in settings:
        flags += ["--volume", f"{settings['cert']}:{BUILD_CA}:ro"]
        conf.append(f"cert = {BUILD_CA}")
    if "find-links" in settings:
        links = settings["find-links"]
        flags += ["--volume", f"{links}:{links}:ro"]
        conf.append(f"find-links = {links}")
    pip_conf = tmp / "pip.conf"
    pip_conf.write_text("\n".join(conf) + "\n")
    return flags + ["--volume", f"{pip_conf}:{BUILD_PIP_CONF}:ro"]


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------
def _parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def lock_held_by_ancestor(path: Path) -> bool:
    """True when a process above this one holds ``path``'s flock (``flock LOCK make images``)."""
    try:
        ino = path.stat().st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    holders = set()
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(ino):
            holders.add(int(parts[4]))  # "->" lines (waiters) have another shape and never match
    pid = os.getppid()
    while pid > 1:
        if pid in holders:
            return True
        pid = _parent_pid(pid)
    return False


@contextlib.contextmanager
def heavy_lock() -> Iterator[None]:
    """The machine-wide lock for CPU-heavy work (shared with the e2e tests and benchmarks).

    Not taken again when a parent already holds it (``flock /tmp/tj-heavy.lock
    make demo MODE=containers``): a second flock on a new descriptor would wait
    for the parent forever, and every other waiter with it.
    """
    HEAVY_LOCK.touch(exist_ok=True)
    if lock_held_by_ancestor(HEAVY_LOCK):
        yield
        return
    with open(HEAVY_LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 ``URIs:`` or a ``deb`` line)."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^(?:URIs:\s*(\S+)|deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s)", text, re.M):
            uri = m.group(1) or m.group(2)
            if "security" not in uri:
                return uri
    return DEFAULT_MIRROR


def python_base_ref() -> str:
    tag = digest(parts=[RECIPE_VERSION, DEBIAN_SUITE, *DEBIAN_INCLUDE])
    return f"localhost/tj-base-python:{tag}"


def build_python_base(*, ref: str, work: Path) -> None:
    """debootstrap a minimal bookworm with python3 and import it as ``ref``."""
    rootfs = work / "rootfs"
    mirror = debian_mirror()
    _log(f"debootstrap {DEBIAN_SUITE} from {mirror} (about 3 minutes)")
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_INCLUDE)}",
                    DEBIAN_SUITE, str(rootfs), mirror], check=True, stdout=subprocess.DEVNULL)
    python = rootfs / "usr" / "bin" / "python"
    if not python.exists():
        python.symlink_to("python3")
    shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        subprocess.run(["podman", "import", "--change", 'CMD ["python"]', "-", ref],
                       stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)


def torch_base_ref(*, python_ref: str) -> str:
    return f"localhost/tj-base-torch:{digest(parts=[RECIPE_VERSION, python_ref, TORCH_BASE_CONTAINERFILE, torch_requirement()])}"


def build_torch_base(*, ref: str, python_ref: str, work: Path) -> None:
    ctx = work / "torch-base"
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "Containerfile").write_text(TORCH_BASE_CONTAINERFILE)
    podman("build", "--network=host", *build_mounts(tmp=work), "--build-arg", f"BASE={python_ref}",
           "--build-arg", f"TORCH_REQUIREMENT={torch_requirement()}", "-t", ref, str(ctx))


def product_ref(*, image: ProductImage, base_ref: str) -> tuple[str, list[Path]]:
    """The image's hashed reference and its build-context files."""
    dockerfile = ROOT / image.dockerfile
    files = context_files(sources=copy_sources(dockerfile=dockerfile))
    tag = digest(parts=[base_ref, image.base_arg, dockerfile.read_text()], files=files)
    return f"{image.repository}:{tag}", files


def build_product(*, image: ProductImage, ref: str, base_ref: str, files: list[Path], work: Path) -> None:
    """Stage exactly ``files`` as the context and build the unchanged Dockerfile on ``base_ref``."""
    ctx = work / f"ctx-{image.key}"
    for rel in files:
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, ctx / rel)
    podman("build", "--network=host", *build_mounts(tmp=work), "--build-arg", f"{image.base_arg}={base_ref}",
           "-f", str(ROOT / image.dockerfile), "-t", ref, str(ctx))


def _ensure(ref: str, build: Callable[[], None], timings: dict[str, float], name: str) -> None:
    if image_exists(ref):
        _log(f"{name}: cached {ref}")
        return
    t0 = time.monotonic()
    _log(f"{name}: building {ref}")
    build()
    timings[name] = round(time.monotonic() - t0, 1)
    _log(f"{name}: built in {timings[name]} s")


def build_all() -> dict[str, str]:
    """Build what is missing; returns (and writes to :data:`IMAGES_FILE`) every image reference."""
    if not shutil.which("podman"):
        raise SystemExit("podman is not installed: run python -m localcluster.tools install")
    t0 = time.monotonic()
    refs = {"python": python_base_ref()}
    refs["torch"] = torch_base_ref(python_ref=refs["python"])
    products = {img.key: product_ref(image=img, base_ref=refs[img.base_key]) for img in PRODUCT_IMAGES}
    refs.update({key: ref for key, (ref, _) in products.items()})
    timings: dict[str, float] = {}
    if not all(image_exists(ref) for ref in refs.values()):
        with heavy_lock(), tempfile.TemporaryDirectory(prefix="tj-images-") as tmp:
            work = Path(tmp)
            _ensure(refs["python"], lambda: build_python_base(ref=refs["python"], work=work), timings, "base python")
            _ensure(refs["torch"], lambda: build_torch_base(ref=refs["torch"], python_ref=refs["python"], work=work),
                    timings, "base torch")
            for img in PRODUCT_IMAGES:
                ref, files = products[img.key]
                _ensure(ref, lambda img=img, ref=ref, files=files: build_product(
                    image=img, ref=ref, base_ref=refs[img.base_key], files=files, work=work), timings, img.key)
    IMAGES_FILE.parent.mkdir(parents=True, exist_ok=True)
    IMAGES_FILE.write_text(json.dumps(refs, indent=2) + "\n")
    _log(f"done in {time.monotonic() - t0:.1f} s; references in {IMAGES_FILE}")
    return refs


def load_refs() -> dict[str, str] | None:
    """The references ``make images`` wrote, or None if it has not run (or an image is gone)."""
    try:
        refs = json.loads(IMAGES_FILE.read_text())
    except (OSError, ValueError):
        return None
    if not shutil.which("podman") or not all(image_exists(r) for r in refs.values()):
        return None
    return refs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m localcluster.images", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["build", "show"], nargs="?", default="build")
    a = ap.parse_args(argv)
    if a.command == "show":
        refs = load_refs()
        print(json.dumps(refs, indent=2) if refs else "no images: run make images")
        return 0 if refs else 1
    build_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
