"""Kopf logs in with the operator's own loader (:mod:`.kubeconfig`).

Kopf's built-in kubeconfig login knows tokens and client certificates but not
exec credential plugins, and it prefers the in-cluster account to an explicit
``$KUBECONFIG``. With this handler Kopf's watches and the operator's own
client (:class:`.kube.Kube`) always act as the same identity, found the same
way. Kopf calls it again after a 401, which renews an expired credential.
"""

from __future__ import annotations

import datetime
from typing import Any

import kopf

from .kubeconfig import ConfigError, load_config

#: Seconds before Kopf tries again after a failed login (an exec plugin that failed, a kubeconfig not there yet).
RETRY_SECONDS = 10


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """The connection for Kopf: server, CA, and the current credential.

    Raises:
        kopf.TemporaryError: The config or its credential cannot be had now;
            the message names what failed (never a credential).
    """
    try:
        cfg = load_config()
        token = cfg.bearer_token()  # runs the exec plugin if there is one
    except (ConfigError, OSError) as e:
        raise kopf.TemporaryError(f"cannot log in: {e}", delay=RETRY_SECONDS) from None
    expires = cfg.expires_at()
    return kopf.ConnectionInfo(
        server=cfg.server,
        token=token,
        ca_path=cfg.ca_path,
        insecure=True if cfg.ssl_context is False else None,
        certificate_path=cfg.cert_path,
        private_key_path=cfg.key_path,
        expiration=datetime.datetime.fromtimestamp(expires, datetime.timezone.utc) if expires else None,
    )
