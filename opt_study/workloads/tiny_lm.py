"""tiny_lm: a small decoder-only transformer on a byte-level text corpus.

The model is GPT-2 shaped (Radford et al. 2019,
https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf):
pre-LayerNorm blocks of causal self-attention and a GELU MLP, learned absolute positions,
and a final LayerNorm. The output head is UNTIED from the token embedding: a shared
parameter appears twice in the module tree, which ZeRO-3 partitioning and per-parameter
measurement would have to special-case; untied, every parameter is one tensor.

Tokens are raw bytes (vocabulary 256) of `corpus`: "builtin" is the frozen file
`opt_study/workloads/data/corpus.txt` shipped in the package, anything else a path to a UTF-8
text file. The last `val_fraction` of the bytes is held out for evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from opt_study.config import FieldError
from opt_study.workloads.base import Batch, Workload, eval_slices, seeded_build

VOCAB = 256


@dataclass(frozen=True)
class TinyLMConfig:
    layers: int = 2  # transformer blocks
    heads: int = 2  # attention heads; must divide width
    width: int = 64  # residual stream width (d_model)
    context: int = 64  # tokens per training window
    dropout: float = 0.1  # on attention weights, residual branches and embeddings
    corpus: str = "builtin"  # "builtin" or a path to a UTF-8 text file
    val_fraction: float = 0.1  # the last fraction of the corpus, held out

    def __post_init__(self):
        for name, lo, hi in (("layers", 1, 256), ("heads", 1, 1024), ("width", 1, 65536), ("context", 1, 1 << 20)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise FieldError(name, f"must be an integer in [{lo}, {hi}], got {v!r}")
        if self.width % self.heads:
            raise FieldError("heads", f"must divide width={self.width}, got {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise FieldError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.corpus, str) or not self.corpus:
            raise FieldError("corpus", "must be 'builtin' or a path to a UTF-8 text file")
        if not 0.0 < self.val_fraction < 1.0:
            raise FieldError("val_fraction", f"must be in (0, 1), got {self.val_fraction!r}")


def load_corpus(corpus: str) -> bytes:
    """The corpus bytes: the packaged file for "builtin", else the file at path `corpus`."""
    if corpus == "builtin":
        return resources.files("opt_study.workloads").joinpath("data/corpus.txt").read_bytes()
    path = Path(corpus).expanduser()
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except OSError as e:
        raise FieldError("corpus", f"cannot read {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise FieldError("corpus", f"{str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return data


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention written out, so its dropout draws from the global RNG."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)
        mask = torch.ones(cfg.context, cfg.context, dtype=torch.bool).tril()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        y = (self.attn_drop(att) @ v).transpose(1, 2).reshape(b, t, c)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width), nn.Dropout(cfg.dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """forward(idx [b, t] int64, t <= context) -> logits [b, t, 256]."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, VOCAB, bias=False)
        self._init_weights(cfg.layers)

    def _init_weights(self, layers: int) -> None:
        # GPT-2 initialisation: N(0, 0.02) weights, zero biases, and the projections that write
        # into the residual stream scaled by 1/sqrt(2 * layers) so its variance does not grow
        # with depth (Radford et al. 2019, section 2.3).
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class TinyLMWorkload(Workload):
    """Next-byte prediction; batches are (inputs [b, context], targets [b, context]) int64."""

    unit = "tokens"

    def __init__(self, cfg: TinyLMConfig, seed: int):
        super().__init__(cfg, seed)
        data = torch.frombuffer(bytearray(load_corpus(cfg.corpus)), dtype=torch.uint8)
        n_val = int(len(data) * cfg.val_fraction)
        self.train_data, self.val_data = data[: len(data) - n_val], data[len(data) - n_val :]
        window = cfg.context + 1
        for part, tensor in (("training", self.train_data), ("validation", self.val_data)):
            if len(tensor) < window:
                raise FieldError(
                    "corpus",
                    f"its {part} part has {len(tensor)} bytes, fewer than one window of context + 1 = {window}",
                )
        # Evaluation windows: consecutive, non-overlapping spans of context + 1 bytes of the
        # validation part, in order; fixed by the corpus alone.
        n_win = len(self.val_data) // window
        self.val_windows = self.val_data[: n_win * window].view(n_win, window).long()

    def build_model(self) -> nn.Module:
        return seeded_build(self.seed, lambda: TinyLM(self.cfg))

    def train_batch(self, step: int, index: int, micro_batch_size: int) -> Batch:
        g = self._batch_generator(step, index)
        window = self.cfg.context + 1
        starts = torch.randint(0, len(self.train_data) - window + 1, (micro_batch_size,), generator=g)
        w = self.train_data[starts[:, None] + torch.arange(window)].long()
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    def eval_batches(self, micro_batch_size: int, rank: int, world: int) -> list[Batch]:
        out = []
        for s in eval_slices(len(self.val_windows), micro_batch_size, rank, world):
            w = self.val_windows[s]
            out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
        return out

    def units_per_batch(self, batch: Batch) -> int:
        return batch[1].numel()
