"""The example job: a small deterministic model on synthetic data (CPU, gloo).

Run under torchrun (the operator runs it as
``python -m trainingjob_trainer.launch -m trainingjob_trainer.example ...``)::

    torchrun --nproc-per-node 2 -m trainingjob_trainer.example --steps 50 --sleep-per-step 0.1

It reads the contract env (snapshot URI, backend, every-steps, keep-last,
attempt, resume-from), resumes from the latest complete snapshot, prints one
line per step, takes the coordinated emergency snapshot on SIGTERM (exit code
``contract.EXIT_PREEMPTED_AFTER_SNAPSHOT``) and can write its final weights
for bit-for-bit comparisons. Batches and dropout depend only on
``(seed, step, rank)``, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from trainingjob_trainer import _dist, contract
from trainingjob_trainer.backends import snapshotter_from_env
from trainingjob_trainer.preemption import Preempted, write_termination_message
from trainingjob_trainer.state import ModelOptimizerState, RNGState


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--steps", type=int, default=100, help="total global steps")
    p.add_argument("--sleep-per-step", type=float, default=0.0, help="seconds to sleep per step (demo pacing)")
    p.add_argument("--wrap", choices=["auto", "ddp", "fsdp", "none"], default="auto",
                   help="auto: DDP when world size > 1")
    p.add_argument("--fsdp-state-dict", choices=["sharded", "full"], default="sharded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--every-steps", type=int, default=None, help="overrides $" + contract.ENV_SNAPSHOT_EVERY_STEPS)
    p.add_argument("--backend", default=None, help="overrides $" + contract.ENV_SNAPSHOT_BACKEND)
    p.add_argument("--async-save", action="store_true", help="periodic snapshots in the background")
    p.add_argument("--final-weights", default=None, help="rank 0 torch.saves the full final state dict here")
    return p.parse_args(argv)


def build_model(*, hidden: int, seed: int) -> nn.Module:
    """The same initial weights on every rank."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, hidden), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 4),
    )


def wrap(model: nn.Module, *, how: str, state_dict: str) -> nn.Module:
    """DDP or FSDP (CPU/gloo) around ``model``."""
    if how == "auto":
        how = "ddp" if _dist.world_size() > 1 else "none"
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model)
        ddp.register_comm_hook(None, ordered_mean_hook)
        return ddp
    if how == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType

        fsdp = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
        FSDP.set_state_dict_type(
            fsdp, StateDictType.FULL_STATE_DICT if state_dict == "full" else StateDictType.SHARDED_STATE_DICT
        )
        return fsdp
    return model


def ordered_mean_hook(_state, bucket):  # no annotations: DDP checks them at runtime
    """DDP gradient averaging that sums ranks in rank order, element by element.

    DDP rebuilds its gradient buckets after the first iteration of a process,
    and a ring all-reduce's summation order depends on the bucket layout, so a
    resumed process would differ from an uninterrupted one in the last bit.
    Gathering every rank's bucket and summing in rank order makes the result
    independent of the layout (fine for this small example model).
    """
    buf = bucket.buffer()
    world = dist.get_world_size()
    parts = [torch.empty_like(buf) for _ in range(world)]
    fut = dist.all_gather(parts, buf, async_op=True).get_future()

    def reduce(_: torch.futures.Future) -> torch.Tensor:
        out = parts[0].clone()
        for t in parts[1:]:
            out += t
        return out.div_(world)

    return fut.then(reduce)


def batch(*, seed: int, step: int, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic batch of ``rank`` at ``step``; also reseeds dropout."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    x = torch.randn(size, 16, generator=g)
    y = (x[:, :4] * 2.0 + 0.1 * torch.randn(size, 4, generator=g)).contiguous()
    return x, y


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded model state dict (collective for FSDP)."""
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType

    if isinstance(model, FSDP):
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
            return {k: v.clone() for k, v in model.state_dict().items()}
    inner = getattr(model, "module", model)
    return {k: v.clone() for k, v in inner.state_dict().items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _dist.initialized():
        dist.init_process_group("gloo")
    rank, world = _dist.rank(), _dist.world_size()
    model = wrap(build_model(hidden=args.hidden, seed=args.seed), how=args.wrap, state_dict=args.fsdp_state_dict)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    snap = None
    if os.environ.get(contract.ENV_SNAPSHOT_URI):
        snap = snapshotter_from_env(
            app_state={"train": ModelOptimizerState(model=model, optimizers=[opt]), "rng": RNGState()},
            every_steps=args.every_steps, backend=args.backend, async_save=args.async_save,
            total_steps=args.steps,
        )
    t0 = time.monotonic()
    start = snap.restore_latest() if snap else 0
    if rank == 0:
        print(f"[example] world={world} attempt={snap.attempt if snap else 0} "
              f"backend={snap.backend if snap else None} "
              f"resumed_from={snap.restored_from if snap else None} start_step={start} "
              f"restore_seconds={time.monotonic() - t0:.3f}", flush=True)
    step = start
    try:
        # On an error: local cleanup only, no collective (the other ranks are elsewhere).
        with snap if snap else contextlib.nullcontext():
            for step in range(start + 1, args.steps + 1):
                if args.sleep_per_step:
                    # The pacing stands for the step's compute, which comes before its
                    # gradient all-reduce (as in a real step): a rank lost meanwhile
                    # stops the others in this step's all-reduce, not after it.
                    time.sleep(args.sleep_per_step)
                torch.manual_seed(args.seed * 7919 + step * 31 + rank)  # dropout stream of this step
                x, y = batch(seed=args.seed, step=step, rank=rank, size=args.batch)
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if rank == 0:
                    print(f"[example] step {step}/{args.steps} loss {loss.item():.6f}", flush=True)
                if snap:
                    snap.maybe_save(step)
    except Preempted as p:
        print(f"[example] rank {rank}: preempted, emergency snapshot at step {p.step}: {p.snapshot}", flush=True)
        # The snapshot is committed; what is left is teardown. In about 1 of 20
        # runs of tests/trainer/test_multiprocess.py under load, one rank had not
        # exited 30 s after this line (torchrun then SIGKILLed it), and where it
        # waited is not known: if teardown takes over 15 s, every thread's stack
        # goes to stderr (file, line and function names only) to say where.
        faulthandler.dump_traceback_later(15, exit=False)
        if _dist.initialized():
            dist.destroy_process_group()
        return contract.EXIT_PREEMPTED_AFTER_SNAPSHOT
    state = full_state_dict(model)
    if rank == 0 and args.final_weights:
        torch.save(state, args.final_weights)
    latest = snap.last_marker if snap else None
    write_termination_message(contract.TerminationMessage(
        reason=contract.TERM_REASON_COMPLETED, step=step,
        snapshot=snap.store.uri_for(epoch=latest.epoch, step=latest.step) if snap and latest else None,
        message=f"trained {args.steps} steps",
    ))
    if rank == 0:
        print(f"[example] done at step {step}", flush=True)
    if _dist.initialized():
        dist.destroy_process_group()
    return contract.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
