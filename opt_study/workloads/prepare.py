"""Make the `gpt2` workload's token files from a text corpus: `python -m opt_study.workloads.prepare`.

Output (nanoGPT's format, https://github.com/karpathy/nanoGPT/tree/master/data/openwebtext):
`<out>/train.bin` and `<out>/val.bin`, flat uint16 token ids, and `<out>/meta.json` recording
the tokenizer, its vocabulary size, the end-of-document token and the token counts.

Sources: local UTF-8 text (files, or directories searched recursively for `*.txt`; one file is
one document), or a Hugging Face dataset streamed with the `datasets` package where the network
allows. Every document is followed by the tokenizer's end-of-document token; the last
`val_fraction` of the resulting token stream (at least one token, cut at a token boundary) is the
validation split. Documents are read in the order given (files sorted by path), so the output is
a pure function of the inputs.

Tokenizers:
- "bytes" (the default, fully offline): the UTF-8 bytes of the text, vocabulary 256; byte 0
  (NUL) marks the end of a document and is removed from the text itself. Use `vocab_size: 256`.
- "gpt2": GPT-2's BPE via `tiktoken` (vocabulary 50257, end of text 50256). tiktoken downloads
  its vocabulary file on first use (or reads it from TIKTOKEN_CACHE_DIR), so it needs the network
  once; it is not a dependency of opt_study (`pip install tiktoken`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

TOKEN_DTYPE = np.uint16
CHUNK_TOKENS = 1 << 22  # tokens buffered in memory before a write (8 MiB)


class Tokenizer:
    """name, vocab_size, eot (end-of-document id) and encode(text) -> uint16 array (no eot)."""

    def __init__(self, name: str, vocab_size: int, eot: int, encode: Callable[[str], np.ndarray]):
        self.name, self.vocab_size, self.eot, self.encode = name, vocab_size, eot, encode


def byte_tokenizer() -> Tokenizer:
    def encode(text: str) -> np.ndarray:
        raw = text.encode("utf-8").replace(b"\0", b"")  # byte 0 is reserved for end-of-document
        return np.frombuffer(raw, dtype=np.uint8).astype(TOKEN_DTYPE)

    return Tokenizer("bytes", 256, 0, encode)


def gpt2_tokenizer() -> Tokenizer:
    try:
        import tiktoken
    except ImportError:
        raise SystemExit(
            "the gpt2 tokenizer needs tiktoken (`pip install tiktoken`; it downloads GPT-2's "
            "vocabulary once, or reads TIKTOKEN_CACHE_DIR); or use --tokenizer bytes"
        ) from None
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 - offline, tiktoken raises requests/urllib errors
        raise SystemExit(
            f"tiktoken could not load the gpt2 vocabulary ({type(e).__name__}: {e}); "
            f"it needs the network once or a filled TIKTOKEN_CACHE_DIR"
        ) from None
    return Tokenizer(
        "gpt2", enc.n_vocab, enc.eot_token, lambda text: np.asarray(enc.encode_ordinary(text), dtype=TOKEN_DTYPE)
    )


TOKENIZERS = {"bytes": byte_tokenizer, "gpt2": gpt2_tokenizer}


def text_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, with directories expanded to their `*.txt` files, each list sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*.txt") if f.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {str(p)!r}")
    if not out:
        raise FileNotFoundError("no text files found (directories are searched for *.txt)")
    return out


def local_documents(paths: Iterable[str | Path]) -> Iterator[str]:
    """Each file's text as one document, UTF-8 (an invalid file is an error naming it).

    The file list is built now, so a missing path fails before anything is written.
    """
    return (_read_text(f) for f in text_files(paths))


def _read_text(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(f)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def hf_documents(name: str, config: str | None, split: str, field: str, limit: int | None) -> Iterator[str]:
    """The `field` of each record of a Hugging Face dataset, streamed (needs `datasets` + network)."""
    try:
        import datasets
    except ImportError:
        raise SystemExit("--hf-dataset needs the `datasets` package (`pip install datasets`)") from None
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for i, record in enumerate(ds):
        if limit is not None and i >= limit:
            return
        yield record[field]


def prepare_token_files(
    documents: Iterable[str],
    out_dir: str | Path,
    tokenizer: str = "bytes",
    val_fraction: float = 0.0005,
    sources: list[str] | None = None,
) -> dict:
    """Tokenize `documents` into out_dir/{train,val}.bin and meta.json; returns the meta dict.

    Streams: at most CHUNK_TOKENS tokens are held in memory, and the split moves only the
    validation tail (the train file is truncated in place), so corpora larger than memory work.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tok = TOKENIZERS[tokenizer]()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp_train, tmp_val = out / ".train.bin.tmp", out / ".val.bin.tmp"
    try:
        total, n_docs = _write_stream(documents, tok, tmp_train)
    except BaseException:
        tmp_train.unlink(missing_ok=True)  # a half-written stream is never left behind
        raise
    n_val = max(1, int(total * val_fraction))
    if total - n_val < 2:
        tmp_train.unlink()
        raise ValueError(f"the corpus has {total} tokens ({n_docs} documents): too few to split")
    tail = np.fromfile(tmp_train, dtype=TOKEN_DTYPE, offset=(total - n_val) * np.dtype(TOKEN_DTYPE).itemsize)
    tail.tofile(tmp_val)
    os.truncate(tmp_train, (total - n_val) * np.dtype(TOKEN_DTYPE).itemsize)
    os.replace(tmp_train, out / "train.bin")
    os.replace(tmp_val, out / "val.bin")
    meta = {
        "format": "uint16 token ids (nanoGPT)",
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eot_token": tok.eot,
        "documents": n_docs,
        "train_tokens": total - n_val,
        "val_tokens": n_val,
        "val_fraction": val_fraction,
        "sources": sources or [],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _write_stream(documents: Iterable[str], tok: Tokenizer, path: Path) -> tuple[int, int]:
    """Every document's tokens followed by tok.eot, appended to `path`: (tokens, documents)."""
    total, n_docs, buf, buffered = 0, 0, [], 0
    eot = np.array([tok.eot], dtype=TOKEN_DTYPE)
    with open(path, "wb") as f:
        for doc in documents:
            ids = tok.encode(doc)
            buf += [ids, eot]
            buffered += len(ids) + 1
            n_docs += 1
            if buffered >= CHUNK_TOKENS:
                total += _flush(f, buf)
                buf, buffered = [], 0
        total += _flush(f, buf)
    return total, n_docs


def _flush(f, buf: list[np.ndarray]) -> int:
    if not buf:
        return 0
    arr = np.concatenate(buf)
    arr.tofile(f)
    return len(arr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opt_study.workloads.prepare", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", metavar="PATH", help="UTF-8 text files or directories of *.txt")
    src.add_argument("--hf-dataset", metavar="NAME", help="a Hugging Face dataset, e.g. openwebtext")
    p.add_argument("--hf-config", default=None, help="the dataset's configuration name")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-field", default="text", help="the record field holding the text")
    p.add_argument("--hf-limit", type=int, default=None, help="read at most this many records")
    p.add_argument("--out", required=True, help="output directory (train.bin, val.bin, meta.json)")
    p.add_argument("--tokenizer", choices=sorted(TOKENIZERS), default="bytes")
    p.add_argument("--val-fraction", type=float, default=0.0005, help="held-out tail of the token stream")
    a = p.parse_args(argv)
    try:
        if a.text:
            docs, sources = local_documents(a.text), [str(Path(t).resolve()) for t in a.text]
        else:
            docs = hf_documents(a.hf_dataset, a.hf_config, a.hf_split, a.hf_field, a.hf_limit)
            sources = [f"hf:{a.hf_dataset}" + (f"/{a.hf_config}" if a.hf_config else "") + f":{a.hf_split}"]
        meta = prepare_token_files(docs, a.out, a.tokenizer, a.val_fraction, sources)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=1))
    print(
        f"use in a study: workload: {{type: gpt2, data_dir: {Path(a.out).resolve()}, vocab_size: {meta['vocab_size']}}}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
