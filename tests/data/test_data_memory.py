"""Bounded memory: preparing a domain (the data stage's streaming split, then its token shards) in a fresh process
peaks at the same resident size for a corpus 9× bigger. Memory, not time, is asserted: a corpus held in memory
would add at least the text's size (32 MB here) to the peak, and its tokens as Python ints several times that; the
bound allows half the text's size (measured: +8 MB, allocator fragmentation and the tokenizer's own buffers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SRC = str(Path(__file__).parents[2] / "src")

CHILD = """
import json, resource, sys
from pathlib import Path
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from bts.data.prepare import prepare_domain, read_split
from bts.data.shards import build_shard

corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(500)}}
tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))  # fast: the test measures bts, not BPE
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
spec = {"source": "files", "files": [str(corpus / "*.txt")], "max_chars": 0}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
info = prepare_domain("big", spec, out / "big")
tokens = 0
for split in ("train", "val", "heldout"):
    shard = build_shard(out / "big" / f"{split}.tokens", read_split(out / "big" / f"{split}.jsonl"), tok,
                        processes=1)
    tokens += len(shard)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kb": before, "peak_kb": peak, "tokens": tokens, "chars": info["chars"]}))
"""


def corpus(root: Path, mb: int) -> Path:
    root.mkdir()
    rng = np.random.default_rng(mb)
    words = np.array([f"w{i}" for i in range(500)], dtype=object)
    for i in range(mb * 5):  # 200 KB files
        text = " ".join(words[rng.integers(0, 500, size=50_000)])[:200_000]
        (root / f"f{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
    return root


def peak_of(tmp_path: Path, mb: int) -> dict:
    src = corpus(tmp_path / f"c{mb}", mb)
    env = {**os.environ, "PYTHONPATH": SRC, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / f"out{mb}")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    small, big = peak_of(tmp_path, 4), peak_of(tmp_path, 36)
    assert big["chars"] > 8 * small["chars"] and big["tokens"] > 8 * small["tokens"]
    growth_mb = (big["peak_kb"] - small["peak_kb"]) / 1024
    text_mb = (big["chars"] - small["chars"]) / 1e6
    assert growth_mb < text_mb / 2, (small, big)
