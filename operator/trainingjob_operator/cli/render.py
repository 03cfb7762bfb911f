"""Pure formatting of the plugin's output: tables like kubectl's, ages, the timeline.

Nothing here does I/O; every function takes the data and ``now``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Iterable, Mapping, Sequence

from trainingjob_trainer import contract

from ..classify import parse_time

NONE = "<none>"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns three spaces apart, headers upper-case (as ``kubectl get``)."""
    cells = [[str(h).upper() for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def human_duration(seconds: float) -> str:
    """A duration the way kubectl prints ages (``45s``, ``3m12s``, ``5h``, ``2d3h``)."""
    s = int(max(0, seconds))
    if s < 120:
        return f"{s}s"
    m, h, d = s // 60, s // 3600, s // 86400
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if h < 3:
        return f"{m}m"
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    if d < 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    return f"{d}d"


def age(value: Any, now: dt.datetime) -> str | None:
    """Age of an RFC 3339 time, ``None`` when absent or unparsable."""
    t = parse_time(value)
    return human_duration((now - t).total_seconds()) if t else None


def human_bytes(n: int | None) -> str | None:
    """``512B``, ``1.5KiB``, ``12.3MiB``, ``2.0GiB``."""
    if n is None:
        return None
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return None  # unreachable


# --------------------------------------------------------------------------
# kubectl tj snapshots
# --------------------------------------------------------------------------
def why_incomplete(info: Any) -> str:
    """A short diagnosis of a folder the completion rule rejects (the verdict is ``info.complete``)."""
    if info.marker is None:
        if contract.COMMIT_MARKER in info.listing:
            return "unreadable commit marker"
        return "no commit marker (save killed, fenced or still running)"
    if (info.marker.epoch, info.marker.step) != (info.epoch, info.step):
        return "commit marker names another step"
    missing = [k for k in info.marker.objects if k not in info.listing]
    # Each object judged by the contract's own rule, one at a time.
    changed = [k for k, v in info.marker.objects.items() if k in info.listing and not contract.snapshot_is_complete(
        dataclasses.replace(info.marker, objects={k: v}), info.name, info.listing)]
    parts = ([f"{len(missing)} object(s) missing"] if missing else []) + (
        [f"{len(changed)} object(s) rewritten since the commit"] if changed else [])
    return ", ".join(parts) or "does not pass the completion rule"


def snapshot_record(info: Any, *, now: dt.datetime, latest_uri: str | None,
                    restored_from: str | None) -> dict[str, Any]:
    """One snapshot folder as a plain dict (the ``-o json`` item and a table row's source).

    Args:
        info: A :class:`trainingjob_trainer.store.SnapshotInfo`.
        now: The current time (UTC).
        latest_uri: ``status.snapshot.latest.uri`` of the job.
        restored_from: ``status.snapshot.restoredFrom`` of the job.
    """
    m = info.marker
    listed = sum(int(o.get("size", 0)) for k, o in info.listing.items() if k != contract.COMMIT_MARKER)
    rec: dict[str, Any] = {
        "name": info.name, "uri": info.uri, "epoch": info.epoch, "step": info.step, "complete": info.complete,
        "attempt": m.attempt if m else None, "bytes": m.total_bytes if m and info.complete else listed,
        "objects": len([k for k in info.listing if k != contract.COMMIT_MARKER]),
        "savedAt": m.saved_at if m else None, "seconds": m.seconds if m else None,
        "emergency": m.emergency if m else None, "backend": m.backend if m else None,
        "age": age(m.saved_at, now) if m else None,
    }
    notes = []
    if not info.complete:
        notes.append(why_incomplete(info))
    if info.uri == latest_uri:
        notes.append("latest")
    if info.uri == (restored_from or "").rstrip("/"):
        notes.append("restored by the current attempt")
    if m and m.emergency:
        notes.append("emergency (SIGTERM)")
    rec["note"] = "; ".join(notes)
    return rec


SNAPSHOT_COLUMNS = ("NAME", "STEP", "EPOCH", "COMPLETE", "ATTEMPT", "SIZE", "SAVE-SECONDS", "AGE", "NOTE")


def snapshots_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The ``kubectl tj snapshots`` table, newest first."""
    rows = [(r["name"], r["step"], r["epoch"], "yes" if r["complete"] else "no", r["attempt"],
             human_bytes(r["bytes"]), r["seconds"], r["age"], r["note"] or None)
            for r in sorted(records, key=lambda r: (r["step"], r["epoch"]), reverse=True)]
    return table(SNAPSHOT_COLUMNS, rows)


# --------------------------------------------------------------------------
# kubectl tj describe
# --------------------------------------------------------------------------
def _kv(lines: list[str], key: str, value: Any, indent: int = 0) -> None:
    if value is None or value == "":
        return
    lines.append(f"{' ' * indent}{key + ':':<{22 - indent}}{value}")


def _fmt_time(value: Any, now: dt.datetime) -> str | None:
    a = age(value, now)
    return f"{value} ({a} ago)" if a else None


def _disruption(d: Mapping[str, Any]) -> str:
    where = f"pod {d.get('pod')}" + (f" on node {d['node']}" if d.get("node") else "")
    bits = [f"{d.get('kind', '?')} {d.get('reason', '')}".strip() + f": {where}", f"attempt {d.get('attempt')}"]
    if d.get("step") is not None:
        bits.append(f"at step {d['step']}")
    if d.get("exitCode") is not None:
        bits.append(f"exit code {d['exitCode']}")
    return ", ".join(bits)


def _mapping_section(lines: list[str], title: str, value: Any, known: Sequence[tuple[str, str]],
                     indent: int = 0) -> None:
    """A status object that may not exist yet (progress, goodput): known keys first, then any others."""
    if not isinstance(value, Mapping) or not value:
        return
    lines.append(f"{' ' * indent}{title}:")
    for key, label in known:
        _kv(lines, label, value.get(key), indent + 2)
    for key in sorted(set(value) - {k for k, _ in known}):
        _kv(lines, key, value[key], indent + 2)


PROGRESS_FIELDS = (("step", "Step"), ("totalSteps", "Total steps"), ("percent", "Percent"),
                   ("stepsPerSecond", "Steps per second"), ("eta", "ETA"), ("updatedAt", "Updated at"))
GOODPUT_FIELDS = (("percent", "Percent"), ("productiveSeconds", "Productive seconds"),
                  ("lostSeconds", "Lost seconds"))
LAST_REQUEST_FIELDS = (("value", "Value"), ("step", "Step"), ("completedAt", "Completed at"))


def event_time(e: Mapping[str, Any]) -> str:
    """When an Event last happened (``eventTime`` or ``lastTimestamp``, else its creation)."""
    return (e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp")
            or (e.get("metadata") or {}).get("creationTimestamp") or "")


def sorted_events(events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Oldest first, by parsed time (then creation order: the resourceVersion)."""
    epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)

    def key(e: Mapping[str, Any]) -> tuple[dt.datetime, int]:
        rv = str((e.get("metadata") or {}).get("resourceVersion") or "0")
        return parse_time(event_time(e)) or epoch, int(rv) if rv.isdigit() else 0

    return sorted(events, key=key)


def pods_table(pods: Sequence[Mapping[str, Any]], now: dt.datetime) -> str:
    """The job's pods by attempt and rank: phase, node, age."""
    def label(p: Mapping[str, Any], key: str) -> str | None:
        return ((p.get("metadata") or {}).get("labels") or {}).get(key)

    def order(p: Mapping[str, Any]) -> tuple[int, int]:
        a, r = label(p, contract.LABEL_ATTEMPT), label(p, contract.LABEL_NODE_RANK)
        return int(a) if str(a).isdigit() else -1, int(r) if str(r).isdigit() else -1

    rows = [(p["metadata"]["name"], label(p, contract.LABEL_ATTEMPT), label(p, contract.LABEL_NODE_RANK),
             ((p.get("status") or {}).get("phase") or "Unknown")
             + (" (terminating)" if p["metadata"].get("deletionTimestamp") else ""),
             (p.get("spec") or {}).get("nodeName"), age(p["metadata"].get("creationTimestamp"), now))
            for p in sorted(pods, key=order)]
    return table(("Name", "Attempt", "Rank", "Phase", "Node", "Age"), rows)


def describe(job: Mapping[str, Any], events: Sequence[Mapping[str, Any]], *, now: dt.datetime,
             pods: Sequence[Mapping[str, Any]] | None = ()) -> str:
    """The ``kubectl tj describe`` text: state, restarts, disruptions, snapshots, pods, conditions, Events.

    Args:
        job: The TrainingJob.
        events: Its Events (any order).
        now: The current time (UTC).
        pods: Its pods; ``None`` when the user may not list them.
    """
    meta, spec, st = job["metadata"], job.get("spec") or {}, job.get("status") or {}
    lines: list[str] = []
    _kv(lines, "Name", meta["name"])
    _kv(lines, "Namespace", meta["namespace"])
    _kv(lines, "Created", _fmt_time(meta.get("creationTimestamp"), now))
    phase = st.get("phase") or "(no status yet: is the operator running?)"
    _kv(lines, "Phase", phase + (f" ({st['reason']})" if st.get("reason") else ""))
    _kv(lines, "Message", st.get("message"))
    _kv(lines, "Attempt", st.get("attempt"))
    workers = st.get("workers") or {}
    if workers:
        _kv(lines, "Workers", f"{workers.get('ready', 0)}/{workers.get('desired', spec.get('nodes'))} ready"
            + (f", {workers['succeeded']} succeeded" if workers.get("succeeded") else ""))
    restarts = st.get("restarts") or {}
    rec = spec.get("recovery") or {}
    if restarts:
        _kv(lines, "Restarts", f"{restarts.get('preemptions', 0)} preemption(s) (max {rec.get('maxPreemptions', '-')}), "
            f"{restarts.get('failures', 0)} failure(s) (max {rec.get('maxFailures', '-')})")
    _kv(lines, "Started", _fmt_time(st.get("startTime"), now))
    _kv(lines, "Attempt started", _fmt_time(st.get("attemptStartTime"), now))
    _kv(lines, "Next restart", st.get("nextRestartTime"))
    _kv(lines, "Completed", _fmt_time(st.get("completionTime"), now))
    last = st.get("lastDisruption") or {}
    if last:
        lines.append("Last disruption:")
        _kv(lines, "What", _disruption(last), 2)
        _kv(lines, "At", _fmt_time(last.get("at"), now), 2)
        _kv(lines, "Message", last.get("message"), 2)
        _kv(lines, "Seconds per step", last.get("secondsPerStep"), 2)
    lost = st.get("lostWork") or {}
    if lost:
        _kv(lines, "Lost work", f"{lost.get('steps', 0)} step(s), {lost.get('seconds', 0)} s (cumulative)")
    _mapping_section(lines, "Progress", st.get("progress"), PROGRESS_FIELDS)
    _mapping_section(lines, "Goodput", st.get("goodput"), GOODPUT_FIELDS)
    snap = st.get("snapshot") or {}
    if snap or spec.get("snapshot"):
        lines.append("Snapshots:")
        _kv(lines, "Folder", contract.job_snapshot_root((spec.get("snapshot") or {}).get("uri", "?"),
                                                          meta["namespace"], meta["name"]), 2)
        latest = snap.get("latest") or {}
        _kv(lines, "Latest", latest.get("uri") or NONE, 2)
        if latest:
            _kv(lines, "Latest step", f"{latest.get('step')} (epoch {latest.get('epoch')}), "
                f"{human_bytes(latest.get('bytes'))}, saved in {latest.get('seconds')} s"
                + (", emergency" if latest.get("emergency") else ""), 4)
            _kv(lines, "Saved at", _fmt_time(latest.get("savedAt"), now), 4)
        _kv(lines, "Complete", snap.get("count"), 2)
        _kv(lines, "Restored from", snap.get("restoredFrom") or (NONE if "restoredAttempt" in snap else None), 2)
        if snap.get("restoredFrom"):
            _kv(lines, "Restored step", snap.get("restoredStep"), 4)
            _kv(lines, "For attempt", snap.get("restoredAttempt"), 4)
        _kv(lines, "Resume from (spec)", (spec.get("snapshot") or {}).get("resumeFrom"), 2)
        _mapping_section(lines, "Last request", snap.get("lastRequest"), LAST_REQUEST_FIELDS, indent=2)
        _kv(lines, "Last error", snap.get("lastError"), 2)
    if pods is None:
        lines.append("Pods: (not allowed to list pods)")
    else:
        lines.append("Pods:" + ("" if pods else f" {NONE}"))
        if pods:
            lines.append(_indent(pods_table(pods, now), 2))
    conds = st.get("conditions") or []
    lines.append("Conditions:" + ("" if conds else f" {NONE}"))
    if conds:
        lines.append(_indent(table(("Type", "Status", "Reason", "Age", "Message"),
                                   [(c.get("type"), c.get("status"), c.get("reason"),
                                     age(c.get("lastTransitionTime"), now), c.get("message"))
                                    for c in conds]), 2))
    evs = sorted_events(events)
    lines.append("Events:" + ("" if evs else f" {NONE}"))
    if evs:
        lines.append(_indent(table(("Time", "Age", "Type", "Reason", "Message"),
                                   [(event_time(e), age(event_time(e), now), e.get("type"), e.get("reason"),
                                     _one_line(e.get("message"))
                                     + (f" (x{e['count']})" if (e.get("count") or 1) > 1 else ""))
                                    for e in evs]), 2))
    return "\n".join(lines)


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def _one_line(text: Any) -> str:
    return " ".join(str(text or "").split())
