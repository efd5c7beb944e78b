"""hf_causal_lm: any Hugging Face `transformers` causal LM built from an `AutoConfig`, random init.

    workload:
      type: hf_causal_lm
      model_type: gpt2                   # any AutoConfig model type with a causal-LM head
      config: {n_layer: 2, n_embd: 64, n_head: 2, vocab_size: 256, n_positions: 64}
      data: builtin                      # builtin | a UTF-8 text file | a prepare.py token directory
      context: 64

Needs the `hf` extra (`pip install -e ".[hf]"`, transformers pinned in pyproject.toml). The model
is `AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))`: the config's
defaults with the overrides applied, weights initialised by the model's own `_init_weights` from
the trial seed. No weights and no tokenizer are downloaded; nothing touches the network. The
overrides are checked against the config class when the study is validated, so a misspelt
`n_layers` is a one-line error instead of an attribute silently ignored.

Data, all local:
- "builtin": the package's `opt_study/workloads/data/corpus.txt` as UTF-8 bytes (vocabulary 256);
- a path to a UTF-8 text file: its bytes (vocabulary 256), the last `val_fraction` held out;
- a directory holding `train.bin` and `val.bin` made by `python -m opt_study.workloads.prepare`
  (uint16 token ids, its `meta.json` vocabulary checked against the model's).
A training micro-batch is `micro_batch_size` windows of `context` tokens at starts drawn uniformly
by the batch's local generator; the evaluation set is up to `eval_windows` non-overlapping windows
spread evenly over the held-out tokens. The loss is the model's own causal-LM loss
(`model(input_ids, labels=input_ids).loss`: shifted by one inside, mean over the
micro_batch_size x (context - 1) predicted tokens, logits upcast to fp32).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from opt_study.config import FieldError
from opt_study.workloads.base import Batch, Workload, eval_slices, seeded_build
from opt_study.workloads.gpt2 import TOKEN_DTYPE
from opt_study.workloads.params import as_kwargs, frozen_kwargs
from opt_study.workloads.tiny_lm import load_corpus

INSTALL = 'needs the transformers package: pip install -e ".[hf]"'
ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class HFCausalLMConfig:
    model_type: str = "gpt2"  # an AutoConfig model type: gpt2, llama, mistral, qwen2, ...
    # AutoConfig overrides (n_layer, hidden_size, vocab_size, ...): a YAML mapping, kept as sorted pairs
    config: Any = ()
    data: str = "builtin"  # "builtin", a UTF-8 text file, or a directory of prepare.py token files
    context: int = 64  # tokens per window (<= the model's max_position_embeddings)
    val_fraction: float = 0.1  # text data: the held-out tail
    eval_windows: int = 64  # held-out windows (fewer if the held-out part is short)
    attn_implementation: str = "sdpa"  # sdpa | eager (both draw dropout from the global RNG)

    def __post_init__(self):
        for name, lo, hi in (("context", 2, 1 << 20), ("eval_windows", 1, 1 << 24)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise FieldError(name, f"must be an integer in [{lo}, {hi}], got {v!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise FieldError("val_fraction", f"must be in (0, 1), got {self.val_fraction!r}")
        if self.attn_implementation not in ATTENTION:
            raise FieldError("attn_implementation", f"must be one of {', '.join(ATTENTION)}")
        if not isinstance(self.data, str) or not self.data or "\0" in self.data:
            raise FieldError("data", "must be 'builtin', a UTF-8 text file or a directory of token files")
        if self.data != "builtin":  # pinned now: Ray workers run in other working directories
            object.__setattr__(self, "data", str(Path(self.data).expanduser().resolve()))
        object.__setattr__(self, "config", frozen_kwargs(self.config, "config"))
        model_config(self)  # the model type and every override, checked against transformers


def model_config(cfg: HFCausalLMConfig):
    """The transformers config object of `cfg`: the model type's defaults plus the overrides."""
    try:
        import transformers
    except ImportError:
        raise FieldError("model_type", INSTALL) from None
    if not isinstance(cfg.model_type, str) or cfg.model_type not in transformers.CONFIG_MAPPING:
        raise FieldError("model_type", f"{cfg.model_type!r:.40} is not a transformers model type (AutoConfig)")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FieldError("model_type", f"{cfg.model_type} has no causal-LM model (AutoModelForCausalLM)")
    config_class = transformers.CONFIG_MAPPING[cfg.model_type]
    known = set(config_class().to_dict()) | set(config_class.attribute_map)
    for key, _ in cfg.config:
        if key not in known:
            raise FieldError("config", f"{key}: not a field of transformers.{config_class.__name__}")
    config = transformers.AutoConfig.for_model(cfg.model_type, **as_kwargs(cfg.config))
    config.use_cache = False  # training: no key/value cache
    if config.max_position_embeddings is not None and cfg.context > config.max_position_embeddings:
        raise FieldError("context", f"must be <= the model's max_position_embeddings {config.max_position_embeddings}")
    return config


class TokenData:
    """The training tokens (in memory, or a memmapped token file read per batch) and the
    evaluation windows; `vocab` is the data's vocabulary size."""

    def __init__(self, cfg: HFCausalLMConfig):
        window = cfg.context
        path = Path(cfg.data)
        if cfg.data != "builtin" and path.is_dir():
            self.train_path, train = path / "train.bin", None
            val, self.vocab = self._token_file(path / "val.bin"), self._meta_vocab(path)
            self.n_train = len(self._token_file(self.train_path))
        else:
            try:
                raw = np.frombuffer(load_corpus(cfg.data), dtype=np.uint8)
            except FieldError as e:
                raise FieldError("data", e.message) from None
            n_val = int(len(raw) * cfg.val_fraction)
            self.train_path, train, val, self.vocab = None, raw[: len(raw) - n_val], raw[len(raw) - n_val :], 256
            self.n_train = len(train)
        self.train = train
        for part, n in (("training", self.n_train), ("held-out", len(val))):
            if n < window:
                raise FieldError("data", f"its {part} part has {n} tokens, fewer than one window of context={window}")
        n_win = min(cfg.eval_windows, len(val) // window)
        stride = len(val) // n_win  # >= window: evenly spread, non-overlapping
        self.val_windows = torch.from_numpy(np.stack([val[i * stride : i * stride + window] for i in range(n_win)]))
        self.val_windows = self.val_windows.long()

    @staticmethod
    def _token_file(path: Path) -> np.ndarray:
        try:
            return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
        except (OSError, ValueError) as e:
            raise FieldError(
                "data", f"cannot read {str(path)!r} ({e}); make it with `python -m opt_study.workloads.prepare`"
            ) from None

    @staticmethod
    def _meta_vocab(path: Path) -> int:
        meta = path / "meta.json"
        return int(json.loads(meta.read_text())["vocab_size"]) if meta.is_file() else 1 << 16

    def windows(self, starts: np.ndarray, window: int) -> torch.Tensor:
        # a fresh memmap per batch (as the gpt2 workload): a long-lived one keeps every page it
        # touched in the worker's resident memory
        data = self.train if self.train is not None else np.memmap(self.train_path, dtype=TOKEN_DTYPE, mode="r")
        return torch.from_numpy(np.stack([data[s : s + window] for s in starts]).astype(np.int64))


class HFCausalLMWorkload(Workload):
    """Batches are (input_ids [b, context], labels [b, context]) int64, labels = input_ids."""

    unit = "tokens"

    def __init__(self, cfg: HFCausalLMConfig, seed: int):
        super().__init__(cfg, seed)
        self.config = model_config(cfg)
        self.data = TokenData(cfg)
        if self.data.vocab > self.config.vocab_size:
            raise FieldError(
                "config",
                f"vocab_size: the data use a vocabulary of {self.data.vocab}; "
                f"set config.vocab_size >= {self.data.vocab}, got {self.config.vocab_size}",
            )

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = seeded_build(
            self.seed,
            lambda: AutoModelForCausalLM.from_config(self.config, attn_implementation=self.cfg.attn_implementation),
        )
        # transformers guesses the loss from the class name and warns when it cannot
        # (GPT2LMHeadModel); name the causal-LM loss the model computes with labels=
        model.loss_type = "ForCausalLM"
        return model

    def train_batch(self, step: int, index: int, micro_batch_size: int) -> Batch:
        g = self._batch_generator(step, index)
        starts = torch.randint(0, self.data.n_train - self.cfg.context + 1, (micro_batch_size,), generator=g)
        ids = self.data.windows(starts.numpy(), self.cfg.context)
        return ids, ids.clone()

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        input_ids, labels = batch
        return model(input_ids=input_ids, labels=labels).loss

    def eval_batches(self, micro_batch_size: int, rank: int, world: int) -> list[Batch]:
        windows = self.data.val_windows
        return [(windows[s], windows[s].clone()) for s in eval_slices(len(windows), micro_batch_size, rank, world)]

    def units_per_batch(self, batch: Batch) -> int:
        return batch[1][:, 1:].numel()  # predicted tokens: every position but the first
