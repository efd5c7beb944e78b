"""gpt2: GPT-2 (124M by default, any size by config) on memory-mapped token files, in plain torch.

The model follows GPT-2 (Radford et al. 2019,
https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf)
as nanoGPT writes it: learned absolute positions, pre-LayerNorm blocks of causal self-attention and
a tanh-GELU MLP, a final LayerNorm, and an output head TIED to the token embedding (one Parameter
owned by two modules, so `named_parameters()` lists it once and the measurement shards see it
once). The defaults are GPT-2 small: 12 layers, 12 heads, width 768, context 1024, vocabulary 50257
(124,439,808 parameters). Precision is DeepSpeed's business (bf16/fp16 cast the module); the loss
is taken in fp32.

Data are nanoGPT's format: `<data_dir>/train.bin` and `<data_dir>/val.bin`, flat arrays of uint16
token ids read with numpy.memmap, made by `python -m opt_study.workloads.prepare`. An optional
`<data_dir>/meta.json` (written by prepare) records the tokenizer's vocabulary size, checked
against `vocab_size`. A training micro-batch is `micro_batch_size` windows of block_size + 1 tokens
at starts drawn uniformly from train.bin by a local generator; the evaluation set is up to
`eval_windows` non-overlapping windows spread evenly over val.bin, fixed by the file alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from opt_study.config import FieldError
from opt_study.workloads.base import Batch, Workload, eval_slices, seeded_build

TOKEN_DTYPE = np.uint16  # nanoGPT's on-disk token type: vocabularies up to 65536


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads; must divide n_embd
    n_embd: int = 768  # residual stream width
    block_size: int = 1024  # context length: tokens per training window
    vocab_size: int = 50257  # GPT-2's BPE; 256 for byte-level token files
    dropout: float = 0.0  # attention, residual and embedding dropout (0 for pretraining)
    data_dir: str = "data/openwebtext"  # holds train.bin / val.bin; relative = to the cwd at load
    eval_windows: int = 1024  # held-out windows of block_size + 1 tokens (fewer if val.bin is short)

    def __post_init__(self):
        for name, lo, hi in (
            ("n_layer", 1, 1024),
            ("n_head", 1, 1024),
            ("n_embd", 1, 1 << 16),
            ("block_size", 1, 1 << 20),
            ("vocab_size", 2, 1 << 16),
            ("eval_windows", 1, 1 << 24),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise FieldError(name, f"must be an integer in [{lo}, {hi}], got {v!r}")
        if self.n_embd % self.n_head:
            raise FieldError("n_head", f"must divide n_embd={self.n_embd}, got {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise FieldError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.data_dir, str) or not self.data_dir or "\0" in self.data_dir:
            raise FieldError("data_dir", "must be a directory path holding train.bin and val.bin")
        # Pin a relative path now: Ray workers run in other working directories. The files need
        # not exist yet (validate checks the config only; the trial opens them).
        object.__setattr__(self, "data_dir", str(Path(self.data_dir).expanduser().resolve()))


def n_params(cfg: GPT2Config) -> int:
    """The model's parameter count, analytically (the tied head counted once)."""
    d, L = cfg.n_embd, cfg.n_layer
    per_block = (2 * 2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return cfg.vocab_size * d + cfg.block_size * d + L * per_block + 2 * d


def flops_per_token(cfg: GPT2Config) -> float:
    """Training FLOPs per token (forward + backward): 6N + 12 L d T, the attention term included.

    Chowdhery et al. 2022 (PaLM), appendix B, https://arxiv.org/abs/2204.02311; N excludes the
    position embeddings, which cost no matrix multiply.
    """
    n = n_params(cfg) - cfg.block_size * cfg.n_embd
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_embd * cfg.block_size


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention through torch's fused kernel (flash attention on GPUs).

    Attention dropout draws from the global (CPU or CUDA) generator, whose state the same-batch
    probe saves and restores, so the probe replays the step's masks.
    """

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU is the tanh approximation
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn, self.mlp = CausalSelfAttention(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """forward(idx [b, t] int64, t <= block_size) -> logits [b, t, vocab_size]."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.block_size = cfg.block_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying (GPT-2; Press & Wolf 2017, https://arxiv.org/abs/1608.05859): one Parameter
        # owned by both modules, the way ZeRO-3 expects a shared weight.
        self.transformer.wte.weight = self.lm_head.weight
        self._init_weights(cfg.n_layer)

    def _init_weights(self, n_layer: int) -> None:
        # GPT-2 initialisation: N(0, 0.02) weights and embeddings, zero biases, and the
        # projections into the residual stream scaled by 1/sqrt(2 n_layer) so the stream's
        # variance does not grow with depth (Radford et al. 2019, section 2.3).
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def _token_file(data_dir: str, name: str, min_tokens: int) -> Path:
    """The path of a token file with at least `min_tokens` tokens, or FieldError("data_dir")."""
    path = Path(data_dir) / name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise FieldError(
            "data_dir",
            f"cannot read {str(path)!r}: {e.strerror or e}; make it with `python -m opt_study.workloads.prepare`",
        ) from None
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    if size % itemsize:
        raise FieldError("data_dir", f"{str(path)!r} has {size} bytes, not a whole number of uint16 tokens")
    if size // itemsize < min_tokens:
        raise FieldError(
            "data_dir",
            f"{str(path)!r} has {size // itemsize} tokens, fewer than one window of block_size + 1 = {min_tokens}",
        )
    return path


class GPT2Workload(Workload):
    """Next-token prediction; batches are (inputs [b, block_size], targets [b, block_size]) int64."""

    unit = "tokens"

    def __init__(self, cfg: GPT2Config, seed: int):
        super().__init__(cfg, seed)
        window = cfg.block_size + 1
        self.train_path = _token_file(cfg.data_dir, "train.bin", window)
        val_path = _token_file(cfg.data_dir, "val.bin", window)
        meta = Path(cfg.data_dir) / "meta.json"
        if meta.is_file():
            vocab = int(json.loads(meta.read_text()).get("vocab_size", 0))
            if vocab > cfg.vocab_size:
                raise FieldError(
                    "vocab_size",
                    f"the token files use a vocabulary of {vocab} "
                    f"({meta}); set vocab_size >= {vocab}, got {cfg.vocab_size}",
                )
        self.n_train = self.train_path.stat().st_size // np.dtype(TOKEN_DTYPE).itemsize
        val = np.memmap(val_path, dtype=TOKEN_DTYPE, mode="r")
        n_win = min(cfg.eval_windows, len(val) // window)
        stride = len(val) // n_win  # >= window: evenly spread, non-overlapping
        starts = np.arange(n_win, dtype=np.int64) * stride
        self.val_windows = self._checked(np.stack([val[s : s + window] for s in starts]))
        del val

    def _checked(self, windows: np.ndarray) -> torch.Tensor:
        w = torch.from_numpy(windows.astype(np.int64))
        if int(w.max()) >= self.cfg.vocab_size:  # an embedding lookup would fail far less clearly
            raise FieldError(
                "vocab_size",
                f"token id {int(w.max())} in {self.cfg.data_dir} is outside the vocabulary of {self.cfg.vocab_size}",
            )
        return w

    def build_model(self) -> nn.Module:
        return seeded_build(self.seed, lambda: GPT2(self.cfg))

    def train_batch(self, step: int, index: int, micro_batch_size: int) -> Batch:
        g = self._batch_generator(step, index)
        window = self.cfg.block_size + 1
        starts = torch.randint(0, self.n_train - window + 1, (micro_batch_size,), generator=g).numpy()
        # A fresh memmap per batch, as nanoGPT does: one long-lived map keeps every page it ever
        # touched counted in the worker's resident memory.
        data = np.memmap(self.train_path, dtype=TOKEN_DTYPE, mode="r")
        w = self._checked(np.stack([data[s : s + window] for s in starts]))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        logits = model(inputs)
        # fp32 softmax over 50k classes: bf16 logits lose the small probabilities' precision.
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def eval_batches(self, micro_batch_size: int, rank: int, world: int) -> list[Batch]:
        out = []
        for s in eval_slices(len(self.val_windows), micro_batch_size, rank, world):
            w = self.val_windows[s]
            out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
        return out

    def units_per_batch(self, batch: Batch) -> int:
        return batch[1].numel()
