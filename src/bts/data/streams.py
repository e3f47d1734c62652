"""Token streams and batches for training and evaluation.

Each domain's documents are tokenised once into one long stream, each document followed by EOS: a token shard on
disk (bts.data.shards.Shard, read through a memory map) or, in tests, a 1-D LongTensor; both slice into
LongTensors. Training batches are a pure function of (seed, step): the domain of each sequence is drawn from the
mix weights and its window from that domain's stream with a generator seeded by the step, so a resumed run sees
exactly the batches it would have seen. With pack=True (data.pack, the default, as in pretraining) a window may
span documents, separated by EOS; with pack=False a window stays inside one document (drawn with probability
proportional to its length) and a short one is padded with EOS, its padding not scored (labels -100).
Held-out loss is scored on consecutive non-overlapping windows, never sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bts.errors import BTSError


def tokenize_stream(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


@dataclass
class Batcher:
    """Batches from a weighted mix of token streams; `batcher(step)` -> list of micro-batches."""

    streams: dict  # name -> 1-D LongTensor
    weights: dict  # name -> mix weight (normalised here)
    seq_len: int
    batch_size: int
    grad_accum: int = 1
    seed: int = 0
    pack: bool = True

    def __post_init__(self):
        for name, stream in self.streams.items():
            if len(stream) <= self.seq_len + 1:
                raise BTSError(f"domain '{name}' has only {len(stream)} training tokens, fewer than one sequence "
                               f"of data.seq_len={self.seq_len}.")
        self.names = [n for n in self.weights if self.weights[n] > 0]
        total = sum(self.weights[n] for n in self.names)
        self.probs = torch.tensor([self.weights[n] / total for n in self.names], dtype=torch.double)
        if not self.pack:
            self.bounds = {n: torch.from_numpy(self.streams[n].doc_bounds()) for n in self.names}

    def __call__(self, step: int) -> list[dict]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        which = torch.multinomial(self.probs, self.batch_size, replacement=True, generator=gen)
        rows, labels = [], []
        for k in which.tolist():
            stream = self.streams[self.names[k]]
            if self.pack:
                start = int(torch.randint(0, len(stream) - self.seq_len, (1,), generator=gen))
                rows.append(stream[start:start + self.seq_len])
                labels.append(rows[-1])
            else:
                row, label = self._in_document(stream, self.bounds[self.names[k]], gen)
                rows.append(row)
                labels.append(label)
        ids = torch.stack(rows)
        labels = ids if self.pack else torch.stack(labels)
        micro = self.batch_size // self.grad_accum
        return [{"input_ids": ids[i:i + micro], "labels": labels[i:i + micro]}
                for i in range(0, self.batch_size, micro)]

    def _in_document(self, stream, bounds: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """A window inside the document holding a uniformly drawn token, EOS-padded (padding labelled -100)."""
        at = int(torch.randint(0, len(stream), (1,), generator=gen))
        doc = int(torch.searchsorted(bounds, at, right=True)) - 1
        lo, hi = int(bounds[doc]), int(bounds[doc + 1])
        start = max(lo, min(at, hi - self.seq_len))
        piece = stream[start:min(hi, start + self.seq_len)]
        pad = self.seq_len - len(piece)
        eos = stream[hi - 1]  # every document ends with its EOS separator
        row = torch.cat([piece, torch.full((pad,), int(eos), dtype=torch.long)])
        label = torch.cat([piece, torch.full((pad,), -100, dtype=torch.long)])
        return row, label


def eval_windows(stream: torch.Tensor, seq_len: int, max_tokens: int = 0) -> torch.Tensor:
    """Consecutive non-overlapping windows [N, seq_len] (the tail shorter than a window is dropped)."""
    if max_tokens:
        stream = stream[:max_tokens]
    n = len(stream) // seq_len
    if n == 0:
        raise BTSError(f"a held-out set has {len(stream)} tokens, fewer than one window of {seq_len}.")
    return stream[: n * seq_len].view(n, seq_len)


def interleave(streams: list[torch.Tensor], chunk: int, max_tokens: int) -> torch.Tensor:
    """A stream that switches domain every `chunk` tokens (for mixed held-out loss and gate plots)."""
    parts, offsets, total = [], [0] * len(streams), 0
    while total < max_tokens:
        progressed = False
        for i, s in enumerate(streams):
            piece = s[offsets[i]:offsets[i] + chunk]
            if len(piece) == chunk:
                parts.append(piece)
                offsets[i] += chunk
                total += chunk
                progressed = True
        if not progressed:
            break
    return torch.cat(parts)[:max_tokens]
