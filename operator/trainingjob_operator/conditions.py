"""Standard Kubernetes conditions, keyed by type (listMapKey=type).

``lastTransitionTime`` changes only when the status flips, so writing the
same condition again is a no-op and the status is not re-written.
"""

from __future__ import annotations

from typing import Any, MutableMapping


def set_condition(
    status: MutableMapping[str, Any],
    type_: str,
    value: bool | str,
    reason: str,
    message: str = "",
    *,
    now: str,
    generation: int | None = None,
) -> None:
    """Insert or update condition ``type_`` in ``status['conditions']``."""
    text = value if isinstance(value, str) else ("True" if value else "False")
    conds = [dict(c) for c in status.get("conditions") or []]
    for c in conds:
        if c.get("type") == type_:
            if c.get("status") != text:
                c["lastTransitionTime"] = now
            c.update(status=text, reason=reason, message=message)
            if generation is not None:
                c["observedGeneration"] = generation
            break
    else:
        c = {"type": type_, "status": text, "reason": reason, "message": message, "lastTransitionTime": now}
        if generation is not None:
            c["observedGeneration"] = generation
        conds.append(c)
    status["conditions"] = conds


def get_condition(status: MutableMapping[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None
