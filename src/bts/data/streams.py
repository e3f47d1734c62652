"""Token streams and batches for training and evaluation.

Each domain's documents are tokenised once into one long stream (documents joined by EOS). Training batches are a
pure function of (seed, step): the domain of each sequence is drawn from the mix weights and its window from that
domain's stream with a generator seeded by the step, so a resumed run sees exactly the batches it would have seen.
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

    def __post_init__(self):
        for name, stream in self.streams.items():
            if len(stream) <= self.seq_len + 1:
                raise BTSError(f"domain '{name}' has only {len(stream)} training tokens, fewer than one sequence "
                               f"of data.seq_len={self.seq_len}.")
        self.names = [n for n in self.weights if self.weights[n] > 0]
        total = sum(self.weights[n] for n in self.names)
        self.probs = torch.tensor([self.weights[n] / total for n in self.names], dtype=torch.double)

    def __call__(self, step: int) -> list[dict]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        which = torch.multinomial(self.probs, self.batch_size, replacement=True, generator=gen)
        rows = []
        for k in which.tolist():
            stream = self.streams[self.names[k]]
            start = int(torch.randint(0, len(stream) - self.seq_len, (1,), generator=gen))
            rows.append(stream[start:start + self.seq_len])
        ids = torch.stack(rows)
        micro = self.batch_size // self.grad_accum
        return [{"input_ids": ids[i:i + micro], "labels": ids[i:i + micro]} for i in range(0, self.batch_size, micro)]


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
