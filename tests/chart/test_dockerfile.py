"""operator/Dockerfile, checked statically (no Docker engine runs here):
pinned base, non-root numeric user, installs the [operator] extra with the
constraints, runs ``python -m trainingjob_operator``, copies only paths that exist.
"""

from __future__ import annotations

import json
import re

from .render import ROOT

DOCKERFILE = ROOT / "operator" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_base_image_is_pinned():
    ins = _instructions()
    args = dict(re.match(r"(\w+)=(\S+)", rest).groups() for op, rest in ins if op == "ARG" and "=" in rest)
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    froms = [rest.split()[0] for op, rest in ins if op == "FROM"]
    assert froms and all(f == "${PYTHON_IMAGE}" for f in froms)


def test_runs_as_non_root_numeric_user():
    users = [rest for op, rest in _instructions() if op == "USER"]
    assert users, "no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0)


def test_installs_operator_extra_with_constraints_and_entrypoint():
    ins = _instructions()
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert "pip install -c constraints.txt '.[operator]'" in runs
    assert "import torch" in runs  # the build asserts torch is NOT installed
    (entry,) = [rest for op, rest in ins if op == "ENTRYPOINT"]
    assert json.loads(entry) == ["python", "-m", "trainingjob_operator"]


def test_copied_paths_exist_in_the_build_context():
    for op, rest in _instructions():
        if op == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing from the repository root"


def test_issue11_make_images_overrides_each_dockerfiles_own_base_arg():
    """``make images`` builds the unchanged Dockerfiles by overriding the base ARG each declares
    and uses in FROM; a renamed ARG would silently fall back to the unreachable public base."""
    from localcluster.images import PRODUCT_IMAGES, copy_sources

    for image in PRODUCT_IMAGES:
        text = (ROOT / image.dockerfile).read_text()
        assert re.search(rf"^ARG {image.base_arg}=\S+", text, re.M), (image.dockerfile, image.base_arg)
        froms = re.findall(r"^FROM (\S+)", text, re.M)
        assert froms and froms[0] == "${" + image.base_arg + "}", (image.dockerfile, froms)
        # The staged build context holds what the COPY lines read, and nothing else.
        assert copy_sources(dockerfile=ROOT / image.dockerfile), image.dockerfile
        for src in copy_sources(dockerfile=ROOT / image.dockerfile):
            assert (ROOT / src).exists(), src
