"""Fixtures shared by the trainer I/O tests (imported by the test modules that use them)."""

from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-rank gloo group (async saves need a process group), destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
