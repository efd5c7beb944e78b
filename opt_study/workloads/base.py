"""The workload interface: a model and its data behind five methods the trial calls.

A workload owns no iterator state. Every training micro-batch is a pure function of
(seed, step, index, micro_batch_size), drawn from a local `torch.Generator`, so a trial can
resume at any step, and the measurement probe can re-read step t's batch, without replaying
a data loader. Model initialisation is a pure function of (config, seed) and leaves the global
torch RNG untouched; the global RNG is left to dropout, whose masks the probe replays by
saving and restoring that state (docs/STACK.md §The same-batch probe).
"""

from __future__ import annotations

import abc
from typing import Callable, ClassVar

import numpy as np
import torch

Batch = tuple[torch.Tensor, ...]  # CPU tensors; the trial moves them to the device

# Stream identifiers: seeds derived for different purposes never collide, even for equal
# (seed, step, index) tuples, because the stream id is part of the entropy.
STREAM_MODEL = 1
STREAM_TRAIN = 2
STREAM_EVAL = 3
STREAM_DATA = 4


def derived_seed(*keys: int) -> int:
    """A 64-bit seed that is a pure function of the non-negative integers `keys`.

    numpy's SeedSequence hashes the whole tuple, so neighbouring keys (step 7 and step 8)
    give unrelated streams, unlike `seed + step` schemes whose streams overlap.
    """
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded with `derived_seed(*keys)`; never touches the global RNG."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derived_seed(*keys))
    return g


def seeded_build(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Run `build()` with the CPU default generator seeded from `seed`, then restore it.

    Modules initialise their parameters from the global CPU generator inside their
    constructors; forking it makes the result a function of `seed` alone and keeps the
    caller's RNG stream (and hence dropout masks later in training) unchanged. Only the CPU
    generator is seeded (not `torch.manual_seed`, which would also reseed every CUDA
    generator outside the fork): models are built on the CPU and moved afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(derived_seed(STREAM_MODEL, seed))
        return build()


def eval_slices(n_items: int, micro_batch_size: int, rank: int, world: int) -> list[slice]:
    """This rank's share of a fixed evaluation set of `n_items`, as equal-sized slices.

    The set is cut in order into batches of `micro_batch_size`; whole rounds of `world`
    batches are kept (the incomplete last round is dropped so every rank gets the same
    number of equal-sized batches) and batch j goes to rank j % world. Concatenating all
    ranks' batches in batch order therefore gives a prefix of the set, the same prefix for
    every call, and the mean of all batch losses is the mean loss over that prefix.
    """
    if micro_batch_size < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(
            f"need micro_batch_size >= 1, world >= 1 and 0 <= rank < world; got {micro_batch_size}, {world}, {rank}"
        )
    rounds = n_items // (micro_batch_size * world)
    if rounds == 0:
        raise ValueError(
            f"the evaluation set has {n_items} items, fewer than one batch per rank "
            f"(micro_batch_size {micro_batch_size} x world {world}); use smaller batches"
        )
    return [
        slice((r * world + rank) * micro_batch_size, (r * world + rank + 1) * micro_batch_size) for r in range(rounds)
    ]


class Workload(abc.ABC):
    """A model + data pair. Subclasses set `unit` and implement the five methods below.

    Contract (what the trial relies on, and what a plugin named by `workload.type:
    mypkg.mod:MyWorkload` or an `opt_study.workloads` entry point must keep):

    - `config_class`: a frozen dataclass of the workload's typed parameters; the YAML's other
      `workload:` keys are its fields, type-checked by opt_study.config.build, and its
      `__post_init__` may raise `opt_study.config.FieldError(field, message)` (or ValueError)
      to refuse a value: `validate` reports it as one line naming the file and the field.
    - `__init__(cfg, seed)`: cfg is a `config_class` instance.
    - every method is a pure function of (cfg, seed and its arguments): no iterator state, so a
      trial resumes at any step and the probe re-reads step t's batch.
    - `build_model` leaves the global torch RNG untouched (use `seeded_build`).
    """

    unit: str  # "tokens" or "samples": what units_per_batch counts
    # The frozen dataclass of the workload's parameters (required for plugins; the built-ins are
    # registered with theirs in opt_study.workloads.WORKLOADS).
    config_class: ClassVar[type | None] = None
    # Training precisions the workload supports. Token workloads feed integer ids, so the model
    # may be cast to bf16/fp16; feature workloads feed float32 tensors to the first layer.
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")

    def __init__(self, cfg, seed: int):
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.cfg = cfg
        self.seed = int(seed)

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A fresh model on the CPU, deterministic in (cfg, seed); the global RNG is untouched."""

    @abc.abstractmethod
    def train_batch(self, step: int, index: int, micro_batch_size: int) -> Batch:
        """The `index`-th micro-batch of optimizer step `step`'s global batch.

        A pure function of (seed, step, index, micro_batch_size). The trial calls it with
        index = micro * world_size + rank.
        """

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar mean loss over the micro-batch; `model` may be a DeepSpeed engine (only called)."""

    @abc.abstractmethod
    def eval_batches(self, micro_batch_size: int, rank: int, world: int) -> list[Batch]:
        """This rank's batches of the fixed held-out set (see `eval_slices`)."""

    @abc.abstractmethod
    def units_per_batch(self, batch: Batch) -> int:
        """How many `unit`s (tokens or samples) the batch's loss averages over."""

    def _batch_generator(self, step: int, index: int) -> torch.Generator:
        """The local generator of one training micro-batch."""
        if step < 0 or index < 0:
            raise ValueError(f"step and index must be >= 0, got step={step}, index={index}")
        return generator(STREAM_TRAIN, self.seed, step, index)
