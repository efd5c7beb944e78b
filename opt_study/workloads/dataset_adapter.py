"""dataset: a user's map-style `torch.utils.data.Dataset` and `nn.Module`, named by import path.

    workload:
      type: dataset
      dataset: mypkg.data:make_dataset     # factory(**dataset_args) -> map-style Dataset
      model: mypkg.models:make_model       # factory(**model_args) -> nn.Module
      loss: cross_entropy                  # cross_entropy | mse
      dataset_args: {n: 1000}
      model_args: {hidden: 64}

The two modules are imported when the trial builds the workload, because the YAML names them;
validate only checks the paths' syntax. Item i of the dataset is a pair (input, target) of tensors,
numbers or arrays, collated by torch's `default_collate`; `loss` is applied to model(inputs) and
targets.

A training micro-batch is `micro_batch_size` indices drawn uniformly with replacement by the
batch's local generator: a pure function of (seed, step, index), with no sampler or iterator
state, so a trial resumes at any step and the probe re-reads step t's batch. Items are read with
the global torch RNG forked and seeded from (seed, step, index), so a random transform inside
`__getitem__` that draws from torch's generator is reproducible too and leaves the training RNG
(dropout masks) untouched; `__getitem__` must not draw from any other RNG.

Evaluation uses a fixed slice: the first `eval_size` items of `eval_dataset` when one is given,
else the last `eval_size` items of `dataset`, which training then never samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset, default_collate

from opt_study.config import FieldError
from opt_study.workloads.base import STREAM_EVAL, STREAM_TRAIN, Batch, Workload, derived_seed, eval_slices, seeded_build
from opt_study.workloads.params import Kwargs, as_kwargs, check_import_path, frozen_kwargs, load_object

LOSSES = {
    "cross_entropy": lambda out, y: F.cross_entropy(out, y),
    "mse": lambda out, y: F.mse_loss(out, y.to(out.dtype)),
}


@dataclass(frozen=True)
class DatasetConfig:
    dataset: str  # import path of a factory (or class) returning a map-style Dataset
    model: str  # import path of a factory (or class) returning an nn.Module
    loss: str = "cross_entropy"  # cross_entropy (targets: class ids) | mse (targets: values)
    # keyword arguments of the factories: a YAML mapping, kept as sorted pairs (workloads.params)
    dataset_args: Any = ()
    model_args: Any = ()  # the same for the model factory
    eval_dataset: str | None = None  # import path of the held-out set's factory (same args)
    eval_size: int = 256  # items in the fixed evaluation slice

    def __post_init__(self):
        check_import_path(self.dataset, "dataset")
        check_import_path(self.model, "model")
        if self.eval_dataset is not None:
            check_import_path(self.eval_dataset, "eval_dataset")
        if self.loss not in LOSSES:
            raise FieldError("loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r:.40}")
        v = self.eval_size
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 24:
            raise FieldError("eval_size", f"must be an integer in [1, {1 << 24}], got {self.eval_size!r}")
        object.__setattr__(self, "dataset_args", frozen_kwargs(self.dataset_args, "dataset_args"))
        object.__setattr__(self, "model_args", frozen_kwargs(self.model_args, "model_args"))


def make_dataset(path: str, kwargs: Kwargs, field: str) -> Dataset:
    """Call the factory at import path `path`; the result must be a non-empty map-style Dataset."""
    factory = load_object(path, field)
    try:
        ds = factory(**as_kwargs(kwargs))
    except TypeError as e:
        raise FieldError(field, f"{path}(**dataset_args) failed: {e}") from None
    if isinstance(ds, IterableDataset) or not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        raise FieldError(
            field, f"{path} must return a map-style Dataset (__getitem__ and __len__), got {type(ds).__name__}"
        )
    if len(ds) < 1:
        raise FieldError(field, f"{path} returned an empty dataset")
    return ds


class DatasetWorkload(Workload):
    """Batches are default_collate'd (inputs, targets); the loss is `cfg.loss` of model(inputs)."""

    unit = "samples"
    precisions = ("fp32",)  # the user's inputs are fed as they are: a bf16 model would refuse float32

    def __init__(self, cfg: DatasetConfig, seed: int):
        super().__init__(cfg, seed)
        self.train = make_dataset(cfg.dataset, cfg.dataset_args, "dataset")
        n = len(self.train)
        if cfg.eval_dataset is not None:
            self.eval_set = make_dataset(cfg.eval_dataset, cfg.dataset_args, "eval_dataset")
            self.eval_items, self.n_train = range(min(cfg.eval_size, len(self.eval_set))), n
        else:
            if n <= cfg.eval_size:
                raise FieldError("eval_size", f"the dataset has {n} items; hold out fewer, got {cfg.eval_size}")
            self.eval_set, self.eval_items, self.n_train = self.train, range(n - cfg.eval_size, n), n - cfg.eval_size

    def build_model(self) -> nn.Module:
        factory = load_object(self.cfg.model, "model")
        model = seeded_build(self.seed, lambda: factory(**as_kwargs(self.cfg.model_args)))
        if not isinstance(model, nn.Module):
            raise FieldError("model", f"{self.cfg.model} must return a torch.nn.Module, got {type(model).__name__}")
        return model

    def _read(self, dataset: Dataset, indices, rng_seed: int) -> Batch:
        # the dataset's own randomness (transforms) from a seed of its own, the caller's RNG kept;
        # the CPU generator only (torch.manual_seed would reseed CUDA's outside the fork)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(rng_seed)
            items = [dataset[int(i)] for i in indices]
        batch = default_collate(items)
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise ValueError(f"{self.cfg.dataset}: an item must be a pair (input, target)")
        return tuple(torch.as_tensor(t) for t in batch)

    def train_batch(self, step: int, index: int, micro_batch_size: int) -> Batch:
        i = torch.randint(0, self.n_train, (micro_batch_size,), generator=self._batch_generator(step, index))
        return self._read(self.train, i.tolist(), derived_seed(STREAM_TRAIN, self.seed, step, index, 1))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return LOSSES[self.cfg.loss](model(x), y)

    def eval_batches(self, micro_batch_size: int, rank: int, world: int) -> list[Batch]:
        items = self.eval_items
        return [
            self._read(self.eval_set, items[s], derived_seed(STREAM_EVAL, s.start))
            for s in eval_slices(len(items), micro_batch_size, rank, world)
        ]

    def units_per_batch(self, batch: Batch) -> int:
        return batch[1].shape[0]
