"""Image references as the kubelet's runtime parses them, and the stand-in's unpullable registry.

The process runtime runs no image, but the kubelet's pull errors are real:
an invalid reference is ``InvalidImageName``, an image under
:data:`UNPULLABLE_REGISTRY` is ``ErrImagePull`` then ``ImagePullBackOff``.
"""

from __future__ import annotations

import re

#: Images under this registry "do not exist": the agent reports ErrImagePull,
#: then ImagePullBackOff, as a kubelet does for a missing image or tag. (.invalid
#: is reserved by RFC 2606: no real registry can ever have this name.)
UNPULLABLE_REGISTRY = "localcluster.invalid/"
#: Seconds from ErrImagePull to ImagePullBackOff (the kubelet's first back-off is 10 s).
IMAGE_PULL_BACKOFF_SECONDS = 1.0
_REF_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REF_PATH = re.compile(rf"^{_REF_COMPONENT}(?:/{_REF_COMPONENT})*$")
_REF_DOMAIN = re.compile(r"^(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])(?:\.(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]))*(?::[0-9]+)?$")
_REF_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_REF_DIGEST = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")


def image_reference_valid(image: str) -> bool:
    """Is ``image`` a valid reference (distribution/reference grammar, as containerd parses it)?"""
    name, _, digest = image.partition("@")
    if digest and not _REF_DIGEST.match(digest):
        return False
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _REF_DOMAIN.match(first):
            return False
        name = rest
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not _REF_TAG.match(tag):
            return False
    return bool(name) and bool(_REF_PATH.match(name)) and len(name) <= 255
