"""Shared helpers of the trainer tests: a tiny model and tensor comparisons."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, *, start: int, stop: int) -> None:
    """Deterministic steps ``start..stop-1``: data from the step number, dropout from the global RNG."""
    for step in range(start, stop):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(4, 8, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def flat_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state dict, keyed by path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}/{i}"))
    return out


def assert_states_equal(a: Any, b: Any) -> int:
    """torch.equal on every tensor of two state dicts; returns how many were compared."""
    fa, fb = flat_tensors(a), flat_tensors(b)
    assert fa.keys() == fb.keys(), (sorted(fa), sorted(fb))
    assert fa, "no tensors compared"
    for k in fa:
        assert torch.equal(fa[k], fb[k]), f"tensor {k} differs"
    return len(fa)


class TensorsState:
    """A Stateful app-state entry of named tensors, restored in place."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in sd.items():
            self.tensors[k].copy_(v)
