"""resnet_cifar: ResNet-18 (CIFAR variant) on CIFAR-10 read from the dataset's binary format.

Model: He, Zhang, Ren & Sun 2016, "Deep Residual Learning for Image Recognition"
(https://arxiv.org/abs/1512.03385), ResNet-18's four stages of two BasicBlocks, adapted to 32×32
inputs the usual way: a 3×3 stride-1 stem and no max-pool (11,173,962 parameters at width 64).
BatchNorm running statistics are module buffers, not parameters: the same-batch probe's second
forward (train mode) updates them unless the probe restores the module's buffers.

Data: "CIFAR-10 binary version" (https://www.cs.toronto.edu/~kriz/cifar.html), files
`data_batch_1.bin` ... `data_batch_5.bin` (training) and `test_batch.bin` (evaluation), each a
sequence of 3073-byte records: one label byte, then 1024 red, 1024 green and 1024 blue pixel
bytes of a 32×32 image in row-major order. Read with numpy; no torchvision.

Training micro-batches sample images uniformly with replacement (so a batch is a pure function
of (seed, step, index), with no epoch state), then apply the standard augmentation: zero-pad 4
pixels, take a random 32×32 crop, flip horizontally with probability 1/2. All randomness comes
from the batch's local generator. Pixels are normalised per channel by the training set's
mean and standard deviation, computed exactly from pixel-value histograms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from opt_study.config import FieldError
from opt_study.workloads.base import Batch, Workload, eval_slices, seeded_build

SIDE, CHANNELS = 32, 3
RECORD_BYTES = 1 + CHANNELS * SIDE * SIDE  # label byte + CHW pixel bytes
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
PAD = 4  # pixels of zero padding before the random crop


@dataclass(frozen=True)
class ResNetCifarConfig:
    data_dir: str = "data/cifar-10-batches-bin"  # relative = to the cwd at load
    blocks: tuple[int, ...] = (2, 2, 2, 2)  # BasicBlocks per stage: ResNet-18
    width: int = 64  # channels of the first stage; stage s has width * 2**s
    num_classes: int = 10  # outputs of the classifier head (CIFAR-10: 10)
    augment: bool = True  # random crop with 4-pixel padding + horizontal flip
    eval_samples: int = 10000  # the first this many test images (all 10,000 by default)

    def __post_init__(self):
        blocks = tuple(self.blocks)
        if (
            not blocks
            or len(blocks) > 8
            or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 64 for b in blocks)
        ):
            raise FieldError("blocks", f"must be 1 to 8 integers in [1, 64], got {self.blocks!r}")
        object.__setattr__(self, "blocks", blocks)
        for name, lo, hi in (("width", 1, 4096), ("num_classes", 2, 256), ("eval_samples", 1, 1 << 24)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise FieldError(name, f"must be an integer in [{lo}, {hi}], got {v!r}")
        if not isinstance(self.augment, bool):
            raise FieldError("augment", f"must be true or false, got {self.augment!r}")
        if not isinstance(self.data_dir, str) or not self.data_dir or "\0" in self.data_dir:
            raise FieldError("data_dir", "must be the directory holding data_batch_*.bin and test_batch.bin")
        object.__setattr__(self, "data_dir", str(Path(self.data_dir).expanduser().resolve()))


def read_cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 3, 32, 32], labels int64 [n]) from one CIFAR-10 binary file."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise FieldError("data_dir", f"cannot read {str(path)!r}: {e.strerror or e}") from None
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise FieldError(
            "data_dir",
            f"{str(path)!r} has {raw.size} bytes, not a whole number of {RECORD_BYTES}-byte CIFAR-10 records",
        )
    records = raw.reshape(-1, RECORD_BYTES)
    return records[:, 1:].reshape(-1, CHANNELS, SIDE, SIDE), records[:, 0].astype(np.int64)


def channel_stats(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of pixel/255, exact, without a float copy.

    A histogram of the 256 byte values per channel gives both moments in float64.
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].reshape(-1), minlength=256).astype(np.float64)
        m = counts @ values / counts.sum()
        mean.append(m)
        std.append(max(np.sqrt(counts @ (values - m) ** 2 / counts.sum()), 1e-3))
    shape = (1, images.shape[1], 1, 1)
    return (torch.tensor(mean, dtype=torch.float32).view(shape), torch.tensor(std, dtype=torch.float32).view(shape))


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 32×32 crop of the zero-padded images and a random horizontal flip, from `g` alone."""
    b = images.shape[0]
    padded = F.pad(images, (PAD, PAD, PAD, PAD))  # uint8 zeros: black, as torchvision pads
    offsets = torch.randint(0, 2 * PAD + 1, (b, 2), generator=g)
    flips = torch.rand(b, generator=g) < 0.5
    ar = torch.arange(SIDE)
    rows = (offsets[:, 0:1] + ar)[:, None, :, None]  # [b, 1, 32, 1]
    cols = offsets[:, 1:2] + ar
    cols = torch.where(flips[:, None], cols.flip(1), cols)[:, None, None, :]  # [b, 1, 1, 32]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(CHANNELS)[None, :, None, None], rows, cols]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (a 1×1 conv + BN where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """forward(images [b, 3, 32, 32] float) -> logits [b, num_classes]."""

    def __init__(self, cfg: ResNetCifarConfig):
        super().__init__()
        w = cfg.width
        self.conv1 = nn.Conv2d(CHANNELS, w, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        stages, c_in = [], w
        for s, n in enumerate(cfg.blocks):
            c_out = w * 2**s
            for i in range(n):
                stages.append(BasicBlock(c_in, c_out, stride=2 if s > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, cfg.num_classes)
        for m in self.modules():
            # He initialisation for ReLU networks (He et al. 2015, https://arxiv.org/abs/1502.01852),
            # fan-out mode as torchvision's ResNet; BatchNorm starts as the identity.
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under DeepSpeed bf16/fp16 the weights are half precision; the loader yields fp32.
        x = x.to(self.conv1.weight.dtype)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.adaptive_avg_pool2d(self.layers(out), 1).flatten(1)
        return self.fc(out)


class ResNetCifarWorkload(Workload):
    """Batches are (images [b, 3, 32, 32] float32, labels [b] int64); loss is mean cross-entropy."""

    unit = "samples"
    precisions = ("fp32",)  # float32 features into the first layer: a bf16 model would refuse them

    def __init__(self, cfg: ResNetCifarConfig, seed: int):
        super().__init__(cfg, seed)
        d = Path(cfg.data_dir)
        parts = [read_cifar_binary(d / f) for f in TRAIN_FILES]
        train_x = np.concatenate([p[0] for p in parts])
        train_y = np.concatenate([p[1] for p in parts])
        test_x, test_y = read_cifar_binary(d / TEST_FILE)
        for name, y in (("training", train_y), ("test", test_y)):
            if int(y.max()) >= cfg.num_classes:
                raise FieldError(
                    "num_classes",
                    f"the {name} labels in {cfg.data_dir} go up to {int(y.max())}; "
                    f"num_classes must be > {int(y.max())}, got {cfg.num_classes}",
                )
        self.mean, self.std = channel_stats(train_x)
        self.train_x, self.train_y = torch.from_numpy(train_x), torch.from_numpy(train_y)
        n_eval = min(cfg.eval_samples, len(test_y))
        self.test_x, self.test_y = torch.from_numpy(test_x[:n_eval]), torch.from_numpy(test_y[:n_eval])

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std

    def build_model(self) -> nn.Module:
        return seeded_build(self.seed, lambda: ResNet(self.cfg))

    def train_batch(self, step: int, index: int, micro_batch_size: int) -> Batch:
        g = self._batch_generator(step, index)
        i = torch.randint(0, len(self.train_y), (micro_batch_size,), generator=g)
        images = self.train_x[i]
        if self.cfg.augment:
            images = augment(images, g)
        return self._normalise(images), self.train_y[i]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images).float(), labels)

    def eval_batches(self, micro_batch_size: int, rank: int, world: int) -> list[Batch]:
        return [
            (self._normalise(self.test_x[s]), self.test_y[s])
            for s in eval_slices(len(self.test_y), micro_batch_size, rank, world)
        ]

    def units_per_batch(self, batch: Batch) -> int:
        return batch[0].shape[0]
