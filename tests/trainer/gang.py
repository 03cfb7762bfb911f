"""Run the example job as a gang of torchrun agents on loopback, like the operator's pods."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from tests.trainer.trainer_s3server import free_port
from trainingjob_trainer import contract

REPO = pathlib.Path(__file__).resolve().parents[2]


@dataclass
class Node:
    """One "pod": a launcher process, its log and its termination-message file."""

    proc: subprocess.Popen
    log: pathlib.Path
    term: pathlib.Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def message(self) -> contract.TerminationMessage | None:
        return contract.parse_termination_message(self.term.read_text()) if self.term.exists() else None

    def kill(self) -> None:
        """Kill the launcher's whole session (launcher, torchrun, workers) by its id."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def start_gang(
    *, nodes: int, procs: int, env: dict[str, str], args: list[str], workdir: pathlib.Path, tag: str
) -> list[Node]:
    """Start ``nodes`` launchers (each ``procs`` workers) rendezvousing on 127.0.0.1."""
    port = free_port()
    out = []
    for i in range(nodes):
        log = workdir / f"{tag}-node{i}.log"
        term = workdir / f"{tag}-node{i}.term"
        node_env = {
            **os.environ,
            **env,
            contract.PET_NNODES: str(nodes),
            contract.PET_NPROC_PER_NODE: str(procs),
            contract.PET_RDZV_BACKEND: contract.RDZV_BACKEND,
            contract.PET_RDZV_ENDPOINT: f"127.0.0.1:{port}",
            contract.PET_RDZV_ID: f"{tag}-{port}",
            contract.PET_MAX_RESTARTS: "0",
            contract.ENV_NODE_RANK: str(i),
            contract.ENV_TERMINATION_MESSAGE_PATH: str(term),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "trainingjob_trainer.launch", "-m", "trainingjob_trainer.example", *args],
                env=node_env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            )
        out.append(Node(proc=proc, log=log, term=term))
    return out


def wait_all(gang: list[Node], *, timeout: float) -> list[int]:
    """Exit codes of every node (kills the gang on timeout; the error carries every node's log's end)."""
    deadline = time.monotonic() + timeout
    try:
        return [n.proc.wait(timeout=max(0.1, deadline - time.monotonic())) for n in gang]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the gang did not exit in {timeout}s:\n"
                             + "\n".join(n.output()[-6000:] for n in gang)) from None
    finally:
        for n in gang:
            n.kill()


def wait_for_text(gang: list[Node], text: str, *, timeout: float) -> None:
    """Wait until some node's log contains ``text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in n.output() for n in gang):
            return
        if any(n.proc.poll() is not None for n in gang):
            raise AssertionError("a node exited early:\n" + "\n".join(n.output()[-3000:] for n in gang))
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen in {timeout}s:\n" + "\n".join(n.output()[-3000:] for n in gang))


def spawn_ranks(fn, *args, world: int = 2, timeout: float = 240) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` fresh processes (gloo on loopback).

    ``fn`` must be importable (a module-level function). A child's exception
    is re-raised here; on timeout every child is killed by its PID.
    """
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise AssertionError(f"ranks still running after {timeout}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join()


def init_ranks(rank: int, world: int, port: int, *, timeout_s: float = 60) -> None:
    """``spawn_ranks`` children: join a gloo group of ``world`` on 127.0.0.1:``port``."""
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def dump(gang: list[Node]) -> str:
    return "\n".join(f"--- {n.log.name} ---\n{n.output()[-4000:]}" for n in gang)


__all__ = ["Node", "start_gang", "wait_all", "wait_for_text", "dump", "json", "spawn_ranks", "init_ranks"]
