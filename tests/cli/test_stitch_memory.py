"""Bounded memory: `bts stitch` streams its text into a token shard, so a fresh process peaks at about the same
resident size for a text 8× bigger. Memory, not time, is asserted: text held in memory would add at least its size
(28 MB more here) to the peak, and its tokens as a LongTensor (8 bytes a token, 1 token per 4 characters) half that
again; the bound allows half the text's size (measured: +6 MB, the tokenizer's buffers and allocator
fragmentation; the in-memory token tensor bts stitch used before: +196 MB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from helpers import tiny_members

SRC = str(Path(__file__).parents[2] / "src")
WORDS = 500

CHILD = """
import json, resource, sys
import bts.data.shards
from bts.pipeline.stitch_job import stitch_job

bts.data.shards.PARALLEL_CHARS = 1 << 62  # tokenize in this process at both sizes: worker processes are not measured

members, corpus, out = sys.argv[1:4]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stitch_job(members + "/hub", [members + "/expert"], [corpus + "/*.txt"], steps=1, out=out, device="cpu",
           overrides=["stitch.num_stitches=1", "data.seq_len=32", "train.batch_size=2", "train.warmup=0"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
job = json.load(open(out + "/training/job.json"))
print(json.dumps({"before_kb": before, "peak_kb": peak, "tokens": job["tokens"]}))
"""


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> Path:
    """Tiny members with a word-level tokenizer (fast: the test measures bts, not BPE)."""
    root = tmp_path_factory.mktemp("members")
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    hub, (expert,) = tiny_members(n=1, vocab_size=len(tok))
    for name, model in (("hub", hub), ("expert", expert)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def corpus(root: Path, mb: int) -> int:
    """mb MB of text in 200 KB txt files; its size in characters."""
    root.mkdir()
    rng = np.random.default_rng(mb)
    words = np.array([f"w{i}" for i in range(WORDS)], dtype=object)
    chars = 0
    for i in range(mb * 5):
        text = " ".join(words[rng.integers(0, WORDS, size=50_000)])[:200_000] + "\n"
        (root / f"f{i:04d}.txt").write_text(text, encoding="utf-8")
        chars += len(text)
    return chars


def peak_of(members: Path, tmp_path: Path, mb: int) -> dict:
    chars = corpus(tmp_path / f"c{mb}", mb)
    env = {**os.environ, "PYTHONPATH": SRC, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(members), str(tmp_path / f"c{mb}"),
                           str(tmp_path / f"out{mb}")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "chars": chars}


def test_peak_memory_does_not_grow_with_the_text(members, tmp_path):
    small, big = peak_of(members, tmp_path, 4), peak_of(members, tmp_path, 32)
    assert big["tokens"] > 7 * small["tokens"] > 0  # all the text was tokenized
    growth_mb = (big["peak_kb"] - small["peak_kb"]) / 1024
    text_mb = (big["chars"] - small["chars"]) / 1e6
    assert growth_mb < text_mb / 2, (small, big)
