"""torchvision: a torchvision classification architecture by name, random init, on local images.

    workload:
      type: torchvision
      arch: resnet18                     # any name in torchvision.models.list_models(torchvision.models)
      num_classes: 10
      image_size: 32
      data: synthetic                    # synthetic | a directory of CIFAR-10 binary files

Needs the `vision` extra (torchvision pinned in pyproject.toml to the torch it was built against).
The model is `torchvision.models.get_model(arch, weights=None, num_classes=..., **model_args)`:
random init from the trial seed, nothing downloaded.

Data (what it is, stated plainly):
- "synthetic" (default, no files): a class-template task generated on the fly. Class c has a fixed
  image T_c ~ N(0, 1)^(3 x S x S); item i has label i mod num_classes and image
  T_label + noise * N(0, 1) noise, both drawn from generators keyed by (data seed 0, c) and
  (data seed 0, i) alone, so every trial and every seed sees the same items. Items
  [0, train_samples) are the training set, the next eval_samples the evaluation set. Learnable
  (the templates are far apart at noise 1), unlike torchvision's FakeData, whose labels are
  independent of its images.
- a directory holding CIFAR-10's binary files (`data_batch_1.bin` ... `data_batch_5.bin`,
  `test_batch.bin`, https://www.cs.toronto.edu/~kriz/cifar.html), read and normalised as the
  resnet_cifar workload reads them (same optional crop + flip augmentation), resized bilinearly
  to image_size when it is not 32. Nothing is downloaded.
Training micro-batches sample items uniformly with replacement from the batch's local generator:
a pure function of (seed, step, index). BatchNorm running statistics are buffers; the probe
restores them (opt_study/measure/probe.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from opt_study.config import FieldError
from opt_study.workloads import resnet_cifar
from opt_study.workloads.base import STREAM_DATA, Batch, Workload, eval_slices, generator, seeded_build
from opt_study.workloads.params import as_kwargs, frozen_kwargs

INSTALL = 'needs the torchvision package: pip install -e ".[vision]" (on a CPU-only torch, the CPU build)'
DATA_SEED = 0  # the synthetic set is the same for every trial and seed


@dataclass(frozen=True)
class TorchvisionConfig:
    arch: str = "resnet18"  # a torchvision.models classification architecture
    num_classes: int = 10  # outputs of the classifier head (synthetic: the number of class templates)
    image_size: int = 32  # side of the square RGB inputs
    data: str = "synthetic"  # "synthetic" or a directory of CIFAR-10 binary files
    train_samples: int = 4096  # synthetic: training items
    eval_samples: int = 512  # synthetic: evaluation items; CIFAR-10: the first this many test images
    noise: float = 1.0  # synthetic: standard deviation of the per-item noise
    augment: bool = False  # CIFAR-10: random crop with 4-pixel padding + horizontal flip
    # keyword arguments of torchvision.models.get_model (e.g. dropout): a YAML mapping, kept as pairs
    model_args: Any = ()

    def __post_init__(self):
        for name, lo, hi in (
            ("num_classes", 2, 1 << 16),
            ("image_size", 8, 4096),
            ("train_samples", 1, 1 << 30),
            ("eval_samples", 1, 1 << 24),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise FieldError(name, f"must be an integer in [{lo}, {hi}], got {v!r}")
        if not 0.0 <= self.noise <= 100.0:
            raise FieldError("noise", f"must be in [0, 100], got {self.noise!r}")
        if not isinstance(self.augment, bool):
            raise FieldError("augment", f"must be true or false, got {self.augment!r}")
        if not isinstance(self.data, str) or not self.data or "\0" in self.data:
            raise FieldError("data", "must be 'synthetic' or a directory of CIFAR-10 binary files")
        if self.data != "synthetic":  # pinned now: Ray workers run in other working directories
            object.__setattr__(self, "data", str(Path(self.data).expanduser().resolve()))
        object.__setattr__(self, "model_args", frozen_kwargs(self.model_args, "model_args"))
        if self.arch not in architectures():
            raise FieldError("arch", f"{self.arch!r:.40} is not a torchvision classification model")


def architectures() -> list[str]:
    """torchvision's classification model names (its detection/segmentation/video ones excluded)."""
    try:
        import torchvision
    except ImportError:
        raise FieldError("arch", INSTALL) from None
    except Exception as e:  # noqa: BLE001 - a CUDA torchvision wheel over a CPU torch fails on import
        raise FieldError("arch", f"torchvision does not load ({type(e).__name__}: {str(e)[:80]}); {INSTALL}") from None
    return torchvision.models.list_models(module=torchvision.models)


class SyntheticImages:
    """Item i: (T_{i mod C} + noise * ε_i, i mod C), ε_i and each T_c from their own generators."""

    def __init__(self, cfg: TorchvisionConfig):
        self.shape = (3, cfg.image_size, cfg.image_size)
        self.num_classes, self.noise = cfg.num_classes, cfg.noise

    def items(self, indices: torch.Tensor) -> Batch:
        labels = indices % self.num_classes
        images = torch.stack(
            [
                torch.randn(self.shape, generator=generator(STREAM_DATA, DATA_SEED, 0, int(c)))
                + self.noise * torch.randn(self.shape, generator=generator(STREAM_DATA, DATA_SEED, 1, int(i)))
                for i, c in zip(indices, labels)
            ]
        )
        return images, labels


class TorchvisionWorkload(Workload):
    """Batches are (images [b, 3, S, S] float32, labels [b] int64); loss is mean cross-entropy."""

    unit = "samples"
    precisions = ("fp32",)  # float32 images into the first layer: a bf16 model would refuse them

    def __init__(self, cfg: TorchvisionConfig, seed: int):
        super().__init__(cfg, seed)
        if cfg.data == "synthetic":
            self.synthetic, self.n_train = SyntheticImages(cfg), cfg.train_samples
            self.eval_items = torch.arange(cfg.train_samples, cfg.train_samples + cfg.eval_samples)
        else:
            self.synthetic = None
            self.cifar = resnet_cifar.ResNetCifarWorkload(
                resnet_cifar.ResNetCifarConfig(
                    data_dir=cfg.data,
                    num_classes=cfg.num_classes,
                    augment=cfg.augment,
                    eval_samples=cfg.eval_samples,
                ),
                seed,
            )
            self.n_train = len(self.cifar.train_y)

    def build_model(self) -> nn.Module:
        import torchvision

        c = self.cfg
        return seeded_build(
            self.seed,
            lambda: torchvision.models.get_model(
                c.arch, weights=None, num_classes=c.num_classes, **as_kwargs(c.model_args)
            ),
        )

    def _resized(self, batch: Batch) -> Batch:
        images, labels = batch
        if images.shape[-1] != self.cfg.image_size:
            images = F.interpolate(images, size=self.cfg.image_size, mode="bilinear", align_corners=False)
        return images, labels

    def train_batch(self, step: int, index: int, micro_batch_size: int) -> Batch:
        if self.synthetic is None:  # CIFAR-10: resnet_cifar's sampling and augmentation
            return self._resized(self.cifar.train_batch(step, index, micro_batch_size))
        i = torch.randint(0, self.n_train, (micro_batch_size,), generator=self._batch_generator(step, index))
        return self.synthetic.items(i)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images).float(), labels)

    def eval_batches(self, micro_batch_size: int, rank: int, world: int) -> list[Batch]:
        if self.synthetic is None:
            return [self._resized(b) for b in self.cifar.eval_batches(micro_batch_size, rank, world)]
        items = self.eval_items
        return [self.synthetic.items(items[s]) for s in eval_slices(len(items), micro_batch_size, rank, world)]

    def units_per_batch(self, batch: Batch) -> int:
        return batch[0].shape[0]
