"""Scale (issue 10): the real operator against a hollow stand-in, N jobs x P pods.

Not part of ``make test`` (``make bench`` runs it; ``--quick`` is the small
check ``tests/localcluster/test_scale_bench.py`` runs). Usage::

    .venv/bin/python bench/scale.py --lock                          # N = 50, 200, 500, one run (heavy lock per N)
    flock /tmp/tj-heavy.lock .venv/bin/python bench/scale.py --jobs 500 --pods-per-job 8 --nodes 100
    .venv/bin/python bench/scale.py --jobs 20 --pods-per-job 4 --quick

Per N, against a fresh stand-in (API server, hollow node agent: pods run no
process, SeaweedFS as S3) and the real operator as a subprocess
(``python -m trainingjob_operator``, its defaults):

1. the bench writes :data:`FOLDERS` complete snapshot folders per job to S3
   itself (the trainer's own :class:`SnapshotStore`, straight to SeaweedFS),
   creates N jobs with snapshots enabled whose S3 endpoint is an
   :mod:`localcluster.s3proxy` per cohort (below), and waits until every job is
   Running with all its workers ready;
2. steady state for ``--steady`` seconds: the operator's API requests, counted
   at the API server from its request log by user agent (the operator's own
   client ``trainingjob-operator/...`` and Kopf's ``kopf/...``; WATCH streams
   excluded, every other request counted, LISTs included), its S3 requests
   (counted by the proxies: only the operator talks to them, hollow pods write
   nothing), its CPU seconds (``/proc/PID/stat``) and its peak RSS (``VmHWM``);
3. preempts one pod in each of ``--preemptions`` jobs (default min(50, N)),
   spread over 10 s (``localcluster.control.preempt``: DisruptionTarget, then a
   graceful DELETE), and measures from the request log, per job, the time from
   the disruption's PATCH reaching the API server to the operator's first
   DELETE of a pod of the old gang (fencing starts) and to its first POST of a
   pod of the new gang (hollow pods honour SIGTERM at once, so the old gang is
   gone within a second);
4. (not with ``--quick``) runs with 10 %, 50 % and 90 % of the jobs finished:
   jobs are created in cohorts whose pods exit 0 after a run time chosen so
   that cohort A (10 %), B (40 %) and C (40 %) finish one after another; D
   (10 %) never finishes. Each stage is measured once its share has finished;
   requests that name a finished job (API) and the S3 requests of a cohort
   whose jobs have all finished show what a retained job costs.

Prints a table per N and a line per N::

    scale jobs=N pods=... reaction_p50_s=... reaction_p99_s=... create_p99_s=... create_from_disruption_p99_s=...
    operator_rss_mb=... operator_cpu_s_per_min=... api_rps_per_job=... s3_rps_per_job=... preemptions=K handled=H

(``create_p99_s``: from the old gang's last pod gone, or the disruption if
later, to the new gang's first POST: the issue's "given the old gang's pods
are gone". ``create_from_disruption_p99_s`` includes the old gang going away.)

(``*_rps_per_job``: requests per second per running job in the steady
state.) Then the targets of the issue, met / missed, at the largest N, and
the growth of the per-job costs from the smallest N to the largest.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainingjob_trainer import contract, s3
from trainingjob_trainer.store import SnapshotStore

from localcluster import control, hollow
from localcluster.cluster import LocalCluster, ManagedProcess
from localcluster.images import heavy_lock
from localcluster.kube import Client, wait_until
from localcluster.s3proxy import S3Proxy

NS = "scale"
SECRET = "s3-creds"
TJ = "trainingjobs"
#: Complete snapshot folders the bench writes per job (steps 100, 200, 300).
FOLDERS = 3
OPERATOR_UA = "trainingjob-operator"
KOPF_UA = "kopf/"
#: Cohorts: share of the jobs, and the stage (1, 2, 3) after which they have finished (None: never).
COHORTS = (("A", 0.1, 1), ("B", 0.4, 2), ("C", 0.4, 3), ("D", 0.1, None))
STAGES = ((1, 0.1), (2, 0.5), (3, 0.9))
TARGETS = {"reaction_p99_s": 2.0, "create_p99_s": 5.0, "operator_rss_mb": 300.0,
           "api_per_job_min": 1.0, "s3_per_job_min": 6.0}


@dataclass
class Settings:
    """What one run measures (from the command line)."""

    pods: int
    nodes: int
    steady: float
    window: float
    preemptions: int | None
    spread: float
    quick: bool
    skip_finished: bool = False
    keep: bool = False


@dataclass
class Window:
    """Costs measured between two instants."""

    seconds: float
    running: int
    finished: int
    api_operator: int
    api_kopf: int
    api_finished: int
    s3: int
    s3_finished_cohorts: int
    finished_cohorts: str
    cpu: float

    def per_job_min(self, count: int) -> float:
        return count / self.seconds * 60.0 / max(1, self.running)


@dataclass
class Result:
    jobs: int
    pods: int
    ready_s: float
    steady: Window
    reactions: list[float] = field(default_factory=list)
    creates: list[float] = field(default_factory=list)
    #: Old gang's last pod gone (or the disruption, if later) -> new gang's first POST: the issue's target.
    creates_after_gone: list[float] = field(default_factory=list)
    #: Disruption -> the old gang's last pod gone: the stand-in's node agent, not the operator.
    gone: list[float] = field(default_factory=list)
    preempted: int = 0
    stages: list[tuple[float, Window]] = field(default_factory=list)
    rss_mb: float = 0.0


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------
class RequestLog:
    """The API server's request log, read incrementally (it grows by megabytes a minute at 500 jobs)."""

    KEEP = ("ts", "method", "verb", "resource", "subresource", "name", "created", "user_agent", "removed")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        self._offset = 0

    def refresh(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            if line.strip():
                e = json.loads(line)
                self.entries.append({k: e.get(k) for k in self.KEEP})
        return self.entries

    def between(self, t0: float, t1: float) -> list[dict[str, Any]]:
        return [e for e in self.refresh() if t0 <= e["ts"] < t1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------
def job_name(i: int) -> str:
    return f"job-{i:04d}"


def cohorts(n: int, quick: bool) -> dict[str, list[str]]:
    """Job names per cohort (``--quick``: one cohort, D, that never finishes)."""
    names = [job_name(i) for i in range(n)]
    if quick:
        return {"D": names}
    out, start = {}, 0
    for label, share, _ in COHORTS:
        size = n - start if label == COHORTS[-1][0] else int(round(share * n))
        out[label] = names[start:start + size]
        start += size
    return out


def job_manifest(name: str, *, pods: int, endpoint: str, bucket: str, run_seconds: float | None) -> dict[str, Any]:
    annotations = {hollow.RUN_SECONDS: str(int(run_seconds))} if run_seconds else {}
    return {
        "apiVersion": f"{contract.GROUP}/{contract.VERSION}", "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "image": "local/none:0", "command": ["python", "-m", "acme.train"], "nodes": pods,
            "snapshot": {"uri": f"s3://{bucket}/scale", "endpoint": endpoint, "everySteps": 100,
                         "credentialsSecret": SECRET},
            "recovery": {"maxPreemptions": 100},
            "terminationGracePeriodSeconds": 5,
            "podTemplate": {"metadata": {"annotations": annotations}},
        },
    }


def write_snapshots(lc: LocalCluster, names: list[str]) -> float:
    """:data:`FOLDERS` complete folders per job, written as the trainer writes them; seconds taken."""
    opts = lc.s3_storage_options()

    def one(name: str) -> None:
        store = SnapshotStore(contract.job_snapshot_root(f"s3://{lc.bucket}/scale", NS, name), storage_options=opts)
        for k in range(1, FOLDERS + 1):
            uri = store.begin(epoch=0, step=100 * k)
            fs, path = s3.filesystem(uri, store.storage_options)
            fs.pipe_file(f"{path}/__0_0.distcp", b"x" * 256)
            store.commit(epoch=0, step=100 * k, save_id=f"a0-bench-{k}", attempt=0, backend="dcp", seconds=0.1)

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, names))
    return time.monotonic() - t0


def statuses(kube: Client) -> dict[str, dict[str, Any]]:
    return {j["metadata"]["name"]: j.get("status") or {} for j in kube.list(TJ, NS)}


def all_running(st: dict[str, dict[str, Any]], n: int) -> bool:
    return len(st) == n and all(s.get("phase") == "Running" and (s.get("workers") or {}).get("ready") ==
                                (s.get("workers") or {}).get("desired") for s in st.values())


class Run:
    """One N: the stand-in, the proxies, the operator, the jobs."""

    def __init__(self, *, n: int, cfg: Settings) -> None:
        self.n, self.cfg = n, cfg
        self.state = Path(tempfile.mkdtemp(prefix=f"tj-scale-{n}-"))
        nodes = [f"hollow-{i:03d}" for i in range(cfg.nodes)]
        capacity = {"*": {"capacity": {"cpu": "10000", "memory": "10000Gi", "pods": "10000"}}}
        self.lc = LocalCluster(self.state, nodes=nodes, hollow=True, node_config=capacity,
                               node_monitor_grace_seconds=40.0)
        self.proxies: dict[str, S3Proxy] = {}
        self.operator: ManagedProcess | None = None
        self.cohorts = cohorts(n, cfg.quick)
        self.log = RequestLog(self.state / "api-requests.jsonl")

    def stop(self) -> None:
        for p in self.proxies.values():
            p.stop()
        self.lc.stop()
        if self.cfg.keep:
            print(f"  [{self.n}] kept {self.state}", flush=True)
        else:
            shutil.rmtree(self.state, ignore_errors=True)

    def window(self, seconds: float, finished: set[str]) -> Window:
        """Measure for ``seconds`` (jobs finished at the start of it: ``finished``)."""
        assert self.operator is not None
        done_cohorts = [c for c, names in self.cohorts.items() if names and set(names) <= finished]
        s3_before = {c: p.stats()["requests"] for c, p in self.proxies.items()}
        cpu0, t0 = cpu_seconds(self.operator.pid), time.time()
        time.sleep(seconds)
        cpu1, t1 = cpu_seconds(self.operator.pid), time.time()
        s3_delta = {c: p.stats()["requests"] - s3_before[c] for c, p in self.proxies.items()}
        reqs = [e for e in self.log.between(t0, t1) if e["verb"] != "watch"]
        ours = [e for e in reqs if (e["user_agent"] or "").startswith(OPERATOR_UA)]
        kopf = [e for e in reqs if (e["user_agent"] or "").startswith(KOPF_UA)]
        return Window(
            seconds=t1 - t0, running=self.n - len(finished), finished=len(finished),
            api_operator=len(ours), api_kopf=len(kopf),
            api_finished=sum(1 for e in ours + kopf if e["resource"] == TJ and e["name"] in finished),
            s3=sum(s3_delta.values()), s3_finished_cohorts=sum(s3_delta[c] for c in done_cohorts),
            finished_cohorts="".join(done_cohorts) or "-", cpu=cpu1 - cpu0)

    def run_seconds(self, stage: int | None, ready_estimate: float) -> float | None:
        """Run time of a cohort's pods so that it finishes after stage ``stage - 1`` was measured."""
        if stage is None:
            return None
        gap = self.cfg.window + 45.0
        return ready_estimate + self.cfg.steady + 60.0 + (stage - 1) * gap

    def start(self) -> float:
        """Stand-in, proxies, snapshots, operator, jobs; returns seconds until all jobs were Running."""
        cfg = self.cfg
        self.lc.start(timeout=300)
        kube = self.lc.client()
        kube.create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        self.lc.create_s3_secret(NS, SECRET)
        for label in self.cohorts:
            self.proxies[label] = S3Proxy(upstream=self.lc.s3_endpoint or "",
                                          log_path=str(self.state / f"s3proxy-{label}.log")).start()
        names = [n for names in self.cohorts.values() for n in names]
        wrote = write_snapshots(self.lc, names)
        print(f"  [{self.n}] wrote {FOLDERS * len(names)} snapshot folders in {wrote:.1f} s", flush=True)
        self.operator = self.lc.start_operator(["--log-level", "WARNING"])
        ready_estimate = 30.0 + 0.05 * self.n * cfg.pods
        t0 = time.monotonic()
        for label, names in self.cohorts.items():
            stage = dict((c, s) for c, _, s in COHORTS).get(label)
            for name in names:
                kube.create(TJ, job_manifest(name, pods=cfg.pods, endpoint=self.proxies[label].endpoint,
                                             bucket=self.lc.bucket,
                                             run_seconds=self.run_seconds(stage, ready_estimate)), NS)
        wait_until(lambda: all_running(statuses(kube), self.n), timeout=600 + 0.2 * self.n * cfg.pods, interval=2.0,
                   what=f"all {self.n} jobs Running")
        return time.monotonic() - t0

    def preempt(self) -> tuple[list[float], list[float], list[float], list[float], int]:
        """Preempt one pod in each of K jobs over ``spread`` s.

        Returns (fencing delays, create delays from the disruption, create delays
        from the old gang's last pod gone, the old gangs' going away, K). A pod is gone at the DELETE that
        removed it (the request log's ``removed``): the node agent's
        ``gracePeriodSeconds=0`` once its process exited, as a kubelet's, or a
        force delete.
        """
        kube = self.lc.client()
        order = [n for label in ("D", "C", "B", "A") for n in self.cohorts.get(label, [])]
        k = min(self.cfg.preemptions if self.cfg.preemptions is not None else 50, len(order))
        victims = order[:k]
        t0, sent = time.monotonic(), []
        for i, job in enumerate(victims):
            time.sleep(max(0.0, t0 + i * self.cfg.spread / max(1, k) - time.monotonic()))
            sent.append(time.time())
            control.preempt(kube, NS, f"{job}-0-{(i % self.cfg.pods)}", reason="PreemptionByScheduler",
                            message="bench/scale.py")

        def recovered() -> bool:
            st = statuses(kube)
            return all(int(st[j].get("attempt") or 0) >= 1 and st[j].get("gangCreated") for j in victims)

        try:
            wait_until(recovered, timeout=120 + 2 * k, interval=1.0, what="every preempted job's new gang")
        except TimeoutError as e:
            print(f"  [{self.n}] {e}", flush=True)
        time.sleep(1.0)  # the last POSTs reach the log
        fences, creates, after_gone, gone_after = [], [], [], []
        entries = self.log.refresh()
        for i, job in enumerate(victims):
            victim = f"{job}-0-{i % self.cfg.pods}"
            t_dis = next((e["ts"] for e in entries if e["ts"] >= sent[i] and e["method"] == "PATCH"
                          and e["resource"] == "pods" and e["name"] == victim and e["subresource"] == "status"), None)
            if t_dis is None:
                continue
            ops = [e for e in entries if e["ts"] >= t_dis and (e["user_agent"] or "").startswith(OPERATOR_UA)
                   and e["resource"] == "pods"]
            t_fence = next((e["ts"] for e in ops if e["method"] == "DELETE"
                            and (e["name"] or "").startswith(f"{job}-0-")), None)
            t_new = next((e["ts"] for e in ops if e["method"] == "POST"
                          and (e["created"] or "").startswith(f"{job}-1-")), None)
            if t_fence is not None and t_new is not None:
                fences.append(t_fence - t_dis)
                creates.append(t_new - t_dis)
                gone = {e["name"]: e["ts"] for e in entries if t_dis <= e["ts"] < t_new and e["method"] == "DELETE"
                        and e["resource"] == "pods" and (e["name"] or "").startswith(f"{job}-0-")
                        and e["removed"]}
                if len(gone) >= self.cfg.pods:
                    after_gone.append(t_new - max(t_dis, *gone.values()))
                    gone_after.append(max(gone.values()) - t_dis)
        return fences, creates, after_gone, gone_after, k

    def stages(self) -> list[tuple[float, Window]]:
        """The 10 / 50 / 90 % finished stages (skipped with ``--quick``)."""
        if self.cfg.quick:
            return []
        kube = self.lc.client()
        out = []
        for _, share in STAGES:
            need = int(round(share * self.n))

            def finished() -> set[str]:
                return {n for n, s in statuses(kube).items() if s.get("phase") in ("Succeeded", "Failed")}

            try:
                wait_until(lambda: len(finished()) >= need, timeout=self.cfg.window + 240, interval=2.0,
                           what=f"{need} of {self.n} jobs finished")
            except TimeoutError as e:
                print(f"  [{self.n}] {e}; measuring with what has finished", flush=True)
            done = finished()
            out.append((len(done) / self.n, self.window(self.cfg.window, done)))
        return out


def measure(n: int, cfg: Settings) -> Result:
    run = Run(n=n, cfg=cfg)
    try:
        ready = run.start()
        print(f"  [{n}] all {n} jobs Running after {ready:.0f} s; steady state {cfg.steady:.0f} s", flush=True)
        time.sleep(min(10.0, cfg.steady / 4))  # the creation burst's last requests settle
        steady = run.window(cfg.steady, set())
        fences, creates, after_gone, gone, k = run.preempt()
        result = Result(jobs=n, pods=cfg.pods, ready_s=ready, steady=steady, reactions=fences, creates=creates,
                        creates_after_gone=after_gone, gone=gone, preempted=k)
        result.stages = [] if cfg.skip_finished else run.stages()
        assert run.operator is not None
        result.rss_mb = peak_rss_mb(run.operator.pid)
        if not run.operator.alive:
            raise RuntimeError(f"the operator exited:\n{run.operator.log_text()[-3000:]}")
        return result
    finally:
        run.stop()


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------
def line(r: Result) -> str:
    w = r.steady
    return (f"scale jobs={r.jobs} pods={r.jobs * r.pods} reaction_p50_s={pct(r.reactions, .5):.3f} "
            f"reaction_p99_s={pct(r.reactions, .99):.3f} create_p99_s={pct(r.creates_after_gone, .99):.3f} "
            f"create_from_disruption_p99_s={pct(r.creates, .99):.3f} "
            f"operator_rss_mb={r.rss_mb:.0f} operator_cpu_s_per_min={w.cpu / w.seconds * 60:.2f} "
            f"api_rps_per_job={w.api_operator / w.seconds / w.running:.4f} "
            f"s3_rps_per_job={w.s3 / w.seconds / w.running:.4f} preemptions={r.preempted} handled={len(r.reactions)}")


def table(r: Result) -> str:
    rows = [("jobs x pods", f"{r.jobs} x {r.pods} ({r.jobs * r.pods} pods)"),
            ("all jobs Running after", f"{r.ready_s:.0f} s")]

    def costs(title: str, w: Window) -> None:
        rows.append((f"{title}: window", f"{w.seconds:.0f} s, {w.running} running, {w.finished} finished"))
        rows.append((f"{title}: API requests / running job / min (operator's client; Kopf's)",
                     f"{w.per_job_min(w.api_operator):.2f}; {w.per_job_min(w.api_kopf):.2f}"))
        rows.append((f"{title}: S3 requests / running job / min", f"{w.per_job_min(w.s3):.2f}"))
        rows.append((f"{title}: operator CPU s / min", f"{w.cpu / w.seconds * 60:.2f}"))

    costs("steady, 0% finished", r.steady)
    rows.append((f"preemptions ({r.preempted} over the spread)",
                 f"{len(r.reactions)} handled ({len(r.creates_after_gone)} with every old pod's removal logged)"))
    for label, vals in (("disruption -> fencing DELETE", r.reactions), ("disruption -> new gang's first POST", r.creates),
                        ("old gang's last pod gone -> new gang's first POST", r.creates_after_gone),
                        ("stand-in: disruption -> old gang's last pod gone", r.gone)):
        rows.append((label, f"p50 {pct(vals, .5):.3f} s, p99 {pct(vals, .99):.3f} s, max {max(vals, default=float('nan')):.3f} s"))
    for share, w in r.stages:
        costs(f"{share:.0%} finished", w)
        rows.append((f"{share:.0%} finished: API requests naming a finished job; S3 requests of finished cohorts ({w.finished_cohorts})",
                     f"{w.api_finished}; {w.s3_finished_cohorts}"))
    rows.append(("operator peak RSS", f"{r.rss_mb:.0f} MB"))
    out = [f"\n### {r.jobs} jobs x {r.pods} pods\n", "| measurement | result |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(out)


def verdicts(results: list[Result]) -> list[str]:
    big = max(results, key=lambda r: r.jobs)
    w = big.steady
    got = {"reaction_p99_s": pct(big.reactions, .99), "create_p99_s": pct(big.creates_after_gone, .99),
           "operator_rss_mb": big.rss_mb, "api_per_job_min": w.per_job_min(w.api_operator + w.api_kopf),
           "s3_per_job_min": w.per_job_min(w.s3)}
    out = [f"\nTargets at {big.jobs} jobs x {big.pods} pods:"]
    for k, limit in TARGETS.items():
        out.append(f"  {k}: {got[k]:.3f} vs <= {limit:g}: {'met' if got[k] <= limit else 'MISSED'}")
    if big.stages:
        last = big.stages[-1][1]
        cost = last.api_finished + last.s3_finished_cohorts
        out.append(f"  finished jobs' requests in the {big.stages[-1][0]:.0%}-finished window: {cost} "
                   f"(target 0): {'met' if cost == 0 else 'MISSED'}")
    small = min(results, key=lambda r: r.jobs)
    if small is not big:
        for title, f in (("API", lambda r: r.steady.per_job_min(r.steady.api_operator + r.steady.api_kopf)),
                         ("S3", lambda r: r.steady.per_job_min(r.steady.s3)),
                         ("CPU", lambda r: r.steady.cpu / r.steady.seconds * 60 / r.jobs)):
            a, b = f(small), f(big)
            ratio = b / a if a else float("inf") if b else 1.0
            out.append(f"  per-job {title} cost {small.jobs} -> {big.jobs} jobs: x{ratio:.2f} (target <= 1.5): "
                       f"{'met' if ratio <= 1.5 else 'MISSED'}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, action="append", help="N (repeatable; default 50, 200, 500)")
    p.add_argument("--pods-per-job", type=int, default=8)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--steady", type=float, default=180.0, help="seconds of steady state measured")
    p.add_argument("--window", type=float, default=60.0, help="seconds measured at each finished share")
    p.add_argument("--preemptions", type=int, default=None, help="jobs preempted (default min(50, N))")
    p.add_argument("--spread", type=float, default=10.0, help="seconds the preemptions are spread over")
    p.add_argument("--quick", action="store_true", help="a short check: 10 s steady state, no finished stages")
    p.add_argument("--skip-finished", action="store_true",
                   help="measure no finished shares (steady state and preemptions only)")
    p.add_argument("--keep", action="store_true", help="keep each N's state folder (logs, the request log)")
    p.add_argument("--lock", action="store_true",
                   help="hold the machine's heavy lock (/tmp/tj-heavy.lock) while each N runs, and only then")
    a = p.parse_args(argv)
    if a.quick:
        a.steady = min(a.steady, 10.0)
        a.nodes = min(a.nodes, 10)
        a.spread = min(a.spread, 5.0)
    cfg = Settings(pods=a.pods_per_job, nodes=a.nodes, steady=a.steady, window=a.window,
                   preemptions=a.preemptions, spread=a.spread, quick=a.quick,
                   skip_finished=a.skip_finished, keep=a.keep)
    results = []
    for n in a.jobs or [50, 200, 500]:
        print(f"N={n}: {n} jobs x {cfg.pods} pods on {cfg.nodes} hollow nodes", flush=True)
        with heavy_lock() if a.lock else contextlib.nullcontext():
            results.append(measure(n, cfg))
        print(table(results[-1]), flush=True)
        print(f"\n{line(results[-1])}", flush=True)
    print()
    for r in results:
        print(line(r))
    print("\n".join(verdicts(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
