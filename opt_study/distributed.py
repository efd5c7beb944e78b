"""Every collective opt_study uses, as small named wrappers that are no-ops on one process.

Only this module touches `torch.distributed` (project rule): measurement code builds local sums
and calls `all_reduce_sum` once; everything else here is process-group bookkeeping.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks (returns `t`); a no-op on one process.

    gloo reduces float64 exactly as given; measurement packs its float64 partial sums into one
    tensor so a measured step costs exactly one collective.
    """
    if is_distributed() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        COUNTERS["all_reduce"] += 1
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_distributed() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        COUNTERS["all_reduce"] += 1
    return t


def all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    """Rank r sends ``inp``'s r-th chunk (``in_splits[r]`` elements, in rank order) to rank r and
    receives rank q's chunk for it into ``out``'s q-th chunk (``out_splits[q]`` elements); a copy
    on one process. 1-D tensors. The whole-tensor optimizers (opt_study.optim.whole_tensor) move
    each tensor's fragments to its owner and the owner's new weights back with it: only the
    fragments travel, no padding."""
    if is_distributed() and world_size() > 1:
        dist.all_to_all_single(out, inp, output_split_sizes=list(out_splits), input_split_sizes=list(in_splits))
        COUNTERS["all_to_all"] += 1
    else:
        out.copy_(inp)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (used for run-level metadata, never tensors)."""
    if not (is_distributed() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's Python object, in rank order (run-level metadata only, never tensors)."""
    if not (is_distributed() and world_size() > 1):
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed() and world_size() > 1:
        dist.barrier()


# Collective counts per process, so benchmarks and tests can assert "one all-reduce per measured
# step" on the real code path rather than trusting a comment.
COUNTERS = {"all_reduce": 0, "all_to_all": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend: str = "gloo", single: bool = False) -> None:
    """Join the process group: reuse one that exists (Ray Train sets one up; Tune may run several
    in-process trials in one actor), join torchrun's from its environment, or make a world of one.

    `single` (the in-process launcher) always makes a world of one on a fresh port: RANK /
    MASTER_PORT inherited from a parent process must never make two trials join one group.
    """
    if is_distributed():
        return
    if not single and all(k in os.environ for k in ("WORLD_SIZE", "MASTER_ADDR", "RANK", "MASTER_PORT")):
        dist.init_process_group(backend=backend)
        return
    os.environ.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
    )
    dist.init_process_group(backend=backend, rank=0, world_size=1)


# How long a rank waits for a peer at a collective, gloo's rendezvous included (torch's default).
COLLECTIVE_S = 1800.0


def rendezvous_store(world: int, timeout_s: float) -> dist.TCPStore:
    """A new group's key-value store, served by this process (its rank 0) on a port the OS picks
    as it binds (`.port`): a port chosen first and bound later could be taken meanwhile, and a
    peer would then meet another group's store or none. `timeout_s` bounds each wait on a key."""
    wait = timedelta(seconds=timeout_s)
    return dist.TCPStore("0.0.0.0", 0, world, is_master=True, timeout=wait, wait_for_workers=False)


def join(backend: str, rank: int, world: int, addr: str, port: int, timeout_s: float, store=None) -> None:
    """Join the group whose rank 0 serves its store (rendezvous_store; passed as `store` on rank 0)
    at addr:port; a peer's connection gives up after `timeout_s`. gloo then waits for every peer
    for COLLECTIVE_S, as at every later collective: the launcher bounds the rendezvous itself
    (opt_study.study.pool)."""
    if store is None:
        store = dist.TCPStore(addr, port, world, is_master=False, timeout=timedelta(seconds=timeout_s))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=COLLECTIVE_S))


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()
