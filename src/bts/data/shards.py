"""Token shards: a split of a domain tokenized once into flat files on disk, read through a memory map.

A shard is a folder (docs/data.md has the format):
    tokens.bin     every document's tokens then its EOS separator, back to back: uint16 when the vocabulary has at
                   most 65,536 entries, else uint32 (little-endian)
    docs.bin       int64 pairs (first token, group number), one per document: the document boundaries and groups
    groups.jsonl   the group names, one JSON string a line, numbered from 0 in order of first appearance
    meta.json      format, dtype, counts, EOS id, and the sha256 of the tokenizer that wrote it
It is written in a temporary folder and renamed into place when complete, so a kill leaves nothing that is read
later, and a re-run writes it again byte for byte (tokenization is per document and chunks are written in order,
whatever the number of processes). A shard read with another tokenizer than its own is refused.

    shard = build_shard("runs/x/data/code/train.tokens", read_split(".../train.jsonl"), tokenizer)
    shard = Shard("runs/x/data/code/train.tokens", tokenizer_hash(tokenizer))
    shard[1000:1128]   # a LongTensor window, read from the memory map
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from bts import faults
from bts.errors import BTSError

FORMAT = "bts.shard/1"
CHUNK_DOCS, CHUNK_CHARS = 512, 1_000_000  # a unit of work for one process (independent of the process count)
PARALLEL_CHARS = 8_000_000  # smaller splits are tokenized in this process (starting workers would cost more)


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what maps text to ids: the fast tokenizer's serialization, else the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class Shard:
    """A written shard, memory-mapped: len() tokens; shard[a:b] is a LongTensor; docs / groups its index."""

    def __init__(self, path, expect_hash: str | None = None):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError):
            raise BTSError(f"{self.path} is not a complete token shard (no readable meta.json); delete it to "
                           f"tokenize again.") from None
        if self.meta.get("format") != FORMAT:
            raise BTSError(f"{self.path} has shard format {self.meta.get('format')!r}, not {FORMAT!r}.")
        if expect_hash is not None and self.meta["tokenizer_sha256"] != expect_hash:
            raise BTSError(f"{self.path} was tokenized by another tokenizer (sha256 "
                           f"{self.meta['tokenizer_sha256'][:12]}…, this one is {expect_hash[:12]}…); delete it "
                           f"to tokenize again.")
        n = self.meta["tokens"]
        self.tokens = (np.memmap(self.path / "tokens.bin", dtype=self.meta["dtype"], mode="r", shape=(n,))
                       if n else np.zeros(0, self.meta["dtype"]))
        d = self.meta["documents"]
        self.docs = (np.memmap(self.path / "docs.bin", dtype="<i8", mode="r", shape=(d, 2))
                     if d else np.zeros((0, 2), "<i8"))

    def __len__(self) -> int:
        return int(self.meta["tokens"])

    def __getitem__(self, key):
        if isinstance(key, slice):
            return torch.from_numpy(self.tokens[key].astype(np.int64))
        return int(self.tokens[key])

    def doc_bounds(self) -> np.ndarray:
        """[documents + 1] token offsets: document i is tokens[bounds[i]:bounds[i + 1]] (its EOS included)."""
        return np.append(self.docs[:, 0], len(self))

    def groups(self) -> list[str]:
        with open(self.path / "groups.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f]


def build_shard(path, docs, tokenizer, *, max_tokens: int = 0, processes: int = 0, total_chars: int = 0,
                desc: str = "tokenize", fault: str | None = None) -> Shard:
    """Tokenize `docs` ((text, group) pairs, read lazily) into the shard at `path`, unless it is there already.
    max_tokens (0 = all) keeps the first max_tokens tokens; processes (0 = up to 8, one per core) tokenize chunks
    of documents side by side; total_chars (when known) gives the progress bar its ETA."""
    path = Path(path)
    want = tokenizer_hash(tokenizer)
    if (path / "meta.json").exists():
        return Shard(path, want)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise BTSError(f"the tokenizer has no EOS token, which separates packed documents in {path}.")
    dtype = dtype_for(len(tokenizer))
    remove_stale(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    from tqdm import tqdm

    t0, n_tokens, n_docs, group_ids, done_chars, said = time.perf_counter(), 0, 0, {}, 0, 0
    bar = tqdm(total=total_chars or None, desc=desc, unit="char", unit_scale=True, disable=None, file=sys.stderr)
    try:
        with open(tmp / "tokens.bin", "wb") as tf, open(tmp / "docs.bin", "wb") as df, \
                open(tmp / "groups.jsonl", "w", encoding="utf-8") as gf:
            workers = processes or min(8, os.cpu_count() or 1)
            for k, (groups, ids, lengths, chars) in enumerate(_encoded(_chunks(docs), tokenizer, eos, dtype,
                                                                       workers if total_chars > PARALLEL_CHARS else 1)):
                starts = n_tokens + np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
                if max_tokens and n_tokens + len(ids) >= max_tokens:
                    keep = max_tokens - n_tokens
                    ids, within = ids[:keep], starts < max_tokens
                    starts, groups = starts[within], [g for g, w in zip(groups, within) if w]
                gids = np.empty(len(groups), np.int64)
                for i, g in enumerate(groups):
                    if g not in group_ids:
                        group_ids[g] = len(group_ids)
                        gf.write(json.dumps(g, ensure_ascii=False) + "\n")
                    gids[i] = group_ids[g]
                tf.write(ids.tobytes())
                df.write(np.stack([starts, gids], axis=1).astype("<i8").tobytes())
                n_tokens, n_docs = n_tokens + len(ids), n_docs + len(groups)
                bar.update(chars)
                done_chars += chars
                if bar.disable and total_chars > PARALLEL_CHARS and done_chars * 10 // total_chars > said:  # a log
                    said, spent = done_chars * 10 // total_chars, time.perf_counter() - t0
                    print(f"[{desc}] {min(100, said * 10)}% eta {spent * (total_chars / done_chars - 1):.0f}s",
                          file=sys.stderr, flush=True)
                if fault:
                    faults.point(f"{fault}:{k}")
                if max_tokens and n_tokens >= max_tokens:
                    break
        meta = {"format": FORMAT, "dtype": dtype.str, "tokens": n_tokens, "documents": n_docs,
                "groups": len(group_ids), "eos_id": eos, "vocab_size": len(tokenizer), "max_tokens": max_tokens,
                "tokenizer_sha256": want}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        for f in tmp.iterdir():  # on disk before the rename makes the shard visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.replace(tmp, path)
        except OSError:  # another process (a torchrun rank) finished the same shard first: theirs is identical
            if not (path / "meta.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    if wall >= 1:  # small shards (the fixtures) pass silently
            print(f"[{desc}] {n_tokens:,} tokens from {n_docs:,} documents in {wall:.1f}s "
              f"({n_tokens / max(wall, 1e-9):,.0f} tok/s)", file=sys.stderr, flush=True)
    return Shard(path, want)


def remove_stale(path: Path) -> None:
    """Remove the temporary folders of `path` left by killed processes (never those of a live one: torchrun ranks
    may write the same shard side by side)."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
            continue  # alive (or not ours to signal): leave it
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _chunks(docs):
    """Lists of (text, group) of at most CHUNK_DOCS documents or about CHUNK_CHARS characters."""
    chunk, chars = [], 0
    for text, group in docs:
        chunk.append((text, group))
        chars += len(text)
        if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encoded(chunks, tokenizer, eos: int, dtype, processes: int):
    """(groups, ids with an EOS after each document, per-document lengths, chars) per chunk, in chunk order. At
    most 2 chunks per process are in flight, so memory does not grow with the corpus."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or processes <= 1:
        def encode(texts):
            if backend is not None:
                return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
            return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

        for chunk in chunks:
            yield _result(chunk, _pack(encode([t for t, _ in chunk]), eos, dtype))
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(processes, initializer=_init_worker, initargs=(backend.to_str(), eos, dtype.str)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_encode_worker, ([t for t, _ in chunk],))))
            if len(pending) >= 2 * processes:
                done, result = pending.popleft()
                yield _result(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield _result(done, result.get())


def _result(chunk, packed):
    flat, lengths = packed
    return [g for _, g in chunk], flat, lengths, sum(len(t) for t, _ in chunk)


def _pack(encoded, eos: int, dtype):
    """One flat array: each document's ids then EOS; and the documents' lengths (EOS included)."""
    lengths = np.array([len(ids) + 1 for ids in encoded], np.int64)
    flat = np.empty(int(lengths.sum()), dtype)
    at = 0
    for ids in encoded:
        flat[at:at + len(ids)] = ids
        flat[at + len(ids)] = eos
        at += len(ids) + 1
    return flat, lengths


_WORKER = {}


def _init_worker(serialized: str, eos: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    from tokenizers import Tokenizer

    _WORKER.update(tokenizer=Tokenizer.from_str(serialized), eos=eos, dtype=np.dtype(dtype))


def _encode_worker(texts: list[str]):
    encoded = [e.ids for e in _WORKER["tokenizer"].encode_batch(texts, add_special_tokens=False)]
    return _pack(encoded, _WORKER["eos"], _WORKER["dtype"])
