"""Token shards (bts.data.shards) and the batches read from them: the format, independence from the number of
processes, a kill mid-tokenization then a byte-identical redo, the tokenizer-hash refusal, max_tokens, and
packed / unpacked windows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_tokenizer
from bts.data import shards
from bts.data.corpora import fixture_corpus
from bts.data.shards import Shard, build_shard, tokenizer_hash
from bts.data.streams import Batcher
from bts.errors import BTSError

SRC = str(Path(shards.__file__).parents[2])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def corpus(n=60):
    """(text, group) pairs: the fixture documents of two domains, repeated with a marker so they differ."""
    docs = fixture_corpus("code") + fixture_corpus("prose")
    return [(f"#{i}\n" + d.text, d.group) for i in range(n // len(docs) + 1) for d in docs][:n]


def files_of(path: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def old_stream(tok, texts):
    """What the pipeline tokenized before shards (bts.data.streams.tokenize_stream): each document then EOS."""
    ids = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids)


def test_shard_holds_every_document_then_eos_with_its_index(tok, tmp_path):
    docs = corpus(30)
    shard = build_shard(tmp_path / "s", iter(docs), tok)
    assert shard.meta["dtype"] == "<u2" and shard.tokens.dtype == np.uint16
    assert torch.equal(shard[0:len(shard)], old_stream(tok, [t for t, _ in docs]))
    bounds = shard.doc_bounds()
    assert len(bounds) == len(docs) + 1 and bounds[0] == 0 and bounds[-1] == len(shard)
    for i, (text, _) in enumerate(docs):
        piece = shard[int(bounds[i]):int(bounds[i + 1])].tolist()
        assert piece[-1] == tok.eos_token_id and tok.decode(piece[:-1]) == text
    names = shard.groups()
    assert [names[g] for g in shard.docs[:, 1]] == [g for _, g in docs]
    assert shard[5:9].dtype == torch.long and isinstance(shard[3], int)


def test_dtype_follows_the_vocabulary():
    assert shards.dtype_for(65_536) == np.uint16 and shards.dtype_for(65_537) == np.uint32
    assert shards.dtype_for(151_936) == np.uint32  # Qwen2.5's vocabulary


def test_shards_do_not_depend_on_the_number_of_processes(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "PARALLEL_CHARS", 0)  # use the worker pool even for this small corpus
    monkeypatch.setattr(shards, "CHUNK_DOCS", 7)
    one = build_shard(tmp_path / "one", iter(corpus()), tok, processes=1, total_chars=1)
    three = build_shard(tmp_path / "three", iter(corpus()), tok, processes=3, total_chars=1)
    assert files_of(one.path) == files_of(three.path)


KILLED = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_tokenizer
from bts.data import shards
from test_shards import corpus
shards.CHUNK_DOCS = 7
shards.build_shard({out!r}, iter(corpus()), tiny_tokenizer(), processes=1, fault="shard:t:train")
"""


def test_a_kill_mid_tokenization_leaves_nothing_read_and_the_redo_is_byte_identical(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "CHUNK_DOCS", 7)
    reference = build_shard(tmp_path / "ref", iter(corpus()), tok)
    out = tmp_path / "train.tokens"
    code = KILLED.format(tests=str(Path(__file__).parents[1]), out=str(out))
    env = {**os.environ, "PYTHONPATH": SRC, "BTS_FAULT_AT": "shard:t:train:2"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parent, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not out.exists()  # nothing under the shard's name
    stale = list(tmp_path.glob(".train.tokens.tmp-*"))
    assert stale and (stale[0] / "tokens.bin").stat().st_size > 0  # it was killed mid-way
    with pytest.raises(BTSError, match="not a complete token shard"):
        Shard(stale[0])
    redone = build_shard(out, iter(corpus()), tok)
    assert files_of(redone.path) == files_of(reference.path)
    assert not list(tmp_path.glob(".train.tokens.tmp-*"))  # the killed run's leftovers are gone


def test_a_shard_of_another_tokenizer_is_refused(tok, tmp_path):
    build_shard(tmp_path / "s", iter(corpus(10)), tok)
    other = tiny_tokenizer(vocab_size=300)
    assert tokenizer_hash(other) != tokenizer_hash(tok)
    with pytest.raises(BTSError, match=r"^\S+/s was tokenized by another tokenizer \(sha256 \w+…, this one is "
                                       r"\w+…\); delete it to tokenize again\.$"):
        build_shard(tmp_path / "s", iter(corpus(10)), other)
    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    assert tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path / "tok")) == tokenizer_hash(tok)  # stable


def test_max_tokens_keeps_exactly_a_prefix(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "CHUNK_DOCS", 4)
    full = build_shard(tmp_path / "full", iter(corpus()), tok)
    cut = build_shard(tmp_path / "cut", iter(corpus()), tok, max_tokens=1234)
    assert len(cut) == 1234 and torch.equal(cut[0:1234], full[0:1234])
    assert np.array_equal(cut.docs, full.docs[full.docs[:, 0] < 1234])


def test_batches_from_a_shard_equal_batches_from_the_same_tensor(tok, tmp_path):
    shard = build_shard(tmp_path / "s", iter(corpus()), tok)
    tensor = shard[0:len(shard)]
    a = Batcher({"x": shard, "y": tensor}, {"x": 1.0, "y": 2.0}, seq_len=32, batch_size=6, grad_accum=2, seed=3)
    b = Batcher({"x": tensor, "y": tensor}, {"x": 1.0, "y": 2.0}, seq_len=32, batch_size=6, grad_accum=2, seed=3)
    for step in (0, 1, 17, 0):
        for ma, mb in zip(a(step), b(step)):
            assert torch.equal(ma["input_ids"], mb["input_ids"]) and torch.equal(ma["labels"], mb["labels"])
    assert not torch.equal(a(1)[0]["input_ids"], a(2)[0]["input_ids"])


def test_unpacked_windows_stay_inside_one_document(tok, tmp_path):
    short = [(f"note {i}: " + "a short line of text " * 2, "notes") for i in range(150)]
    shard = build_shard(tmp_path / "s", iter(corpus(20) + short), tok)
    bounds = shard.doc_bounds()
    b = Batcher({"x": shard}, {"x": 1.0}, seq_len=48, batch_size=16, seed=0, pack=False)
    eos = tok.eos_token_id
    padded = 0
    for step in range(20):
        (micro,) = b(step)
        for ids, labels in zip(micro["input_ids"], micro["labels"]):
            scored = labels[labels != -100]
            assert torch.equal(ids[:len(scored)], scored)  # padding only at the end
            assert bool((ids[len(scored):] == eos).all())
            padded += len(ids) - len(scored)
            # one contiguous piece of one document: no separator inside it, and found in a document
            assert bool((scored[:-1] != eos).all()), "a window crossed a document boundary"
            assert any(_inside(shard, int(bounds[i]), int(bounds[i + 1]), scored) for i in range(len(bounds) - 1))
        assert torch.equal(b(step)[0]["input_ids"], micro["input_ids"])  # still a pure function of the step
    assert padded > 0  # short documents were padded, not joined to the next one


def _inside(shard, lo, hi, piece) -> bool:
    doc = shard[lo:hi]
    if len(piece) > len(doc):
        return False
    return bool((doc.unfold(0, len(piece), 1) == piece).all(dim=1).any())


def test_meta_records_what_docs_data_md_describes(tok, tmp_path):
    shard = build_shard(tmp_path / "s", iter(corpus(10)), tok)
    meta = json.loads((shard.path / "meta.json").read_text())
    assert set(meta) == {"format", "dtype", "tokens", "documents", "groups", "eos_id", "vocab_size", "max_tokens",
                         "tokenizer_sha256"}
    assert (shard.path / "tokens.bin").stat().st_size == 2 * meta["tokens"]
    assert (shard.path / "docs.bin").stat().st_size == 16 * meta["documents"]
