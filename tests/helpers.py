"""Tiny members built locally from configs (no hub access): a seed and experts perturbed away from it."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from bts.eval.downstream.tasks import FIXTURES

VOCAB = 97


# Every family bts supports, as a tiny random config; each shows what makes its family different.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite")


def tiny_config(arch: str = "llama", **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    family = dict(
        llama={},
        mistral=dict(sliding_window=None),
        qwen2=dict(tie_word_embeddings=True),  # biases on q/k/v
        qwen3=dict(head_dim=8),  # q/k norms
        gemma=dict(head_dim=8, num_key_value_heads=1),  # sqrt(d) embedding scale, (1 + w) RMSNorm, tied
        gemma2=dict(head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=8),
        gemma3_text=dict(head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
                         layer_types=["sliding_attention", "full_attention"] * 2),
        phi3=dict(),  # fused qkv_proj and gate_up_proj
        olmo2=dict(),  # post-norms, q/k norms
        granite=dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                     logits_scaling=4.0),
    )
    if arch not in family:
        raise ValueError(arch)
    config = {**common, **family[arch], **overrides}
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, **config)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    attention = "eager" if arch == "gemma2" else "sdpa"  # SDPA has no attention-logit softcapping
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation=attention)
    return model.eval()


def tiny_members(arch: str = "llama", n: int = 2, noise: float = 0.05, **overrides):
    """A seed and n experts branched from it (seed weights + noise), like real continued-pretraining experts."""
    hub = tiny_model(arch, seed=0, **overrides)
    experts = []
    for i in range(n):
        expert = tiny_model(arch, seed=0, **overrides)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen) * p.std().clamp_min(1e-3))
        experts.append(expert)
    return hub, experts


def save_members(tmp_path, arch="llama", n=2, **overrides):
    hub, experts = tiny_members(arch, n, **overrides)
    hub.save_pretrained(tmp_path / "hub")
    paths = []
    for i, e in enumerate(experts):
        e.save_pretrained(tmp_path / f"e{i}")
        paths.append(str(tmp_path / f"e{i}"))
    return str(tmp_path / "hub"), paths


def random_ids(b=2, t=12, seed=0):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def open_stitches(model, seed=0, scale=0.3):
    """Randomise every stitch parameter so the model is far from the hub (tests must not rely on the init)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.stitch_parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


# Overrides that shrink `bts run smoke` to seconds: two fixture domains, two tiny layers, a few steps per phase.
TINY = ["data.domains={code: {source: fixture}, math: {source: fixture}}", "data.eval_tokens=512",
        "tokenizer.vocab_size=256", "seed_model.hidden_size=32", "seed_model.intermediate_size=64",
        "seed_model.num_layers=2", "stitch.num_stitches=1", "baselines.methods=[routing, btx_top2]",
        "baselines.sweep=false", "downstream.tasks=[]",
        *(f"{phase}.train.{key}" for phase in ("seed_model", "experts", "stitch")
          for key in ("ckpt_every=2", "log_every=1")),
        "seed_model.train.steps=6", "experts.train.steps=4", "stitch.train.steps=4"]


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the fixture texts: any string encodes, and decode(encode(s)) == s."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(FIXTURES.glob("*.jsonl")))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@torch.no_grad()
def assert_causal(model, ids, positions):
    """Changing token t+1 leaves the logits at 0..t as they were (≤ 1e-5: batched kernels may differ by rounding)
    and does reach position t+1."""
    base = model(ids).logits
    for t in positions:
        changed = ids.clone()
        changed[0, t + 1] = (changed[0, t + 1] + 7) % VOCAB
        out = model(changed).logits
        assert (out[:, : t + 1] - base[:, : t + 1]).abs().max() <= 1e-5
        assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4  # the change does reach position t+1


def fake_gpus(monkeypatch, n: int = 1) -> None:
    """Make torch report n CUDA GPUs (0: none), so tests can check that bts asks CUDA for its tensors (a CPU-only
    torch then fails with 'Torch not compiled with CUDA enabled') rather than silently staying on the CPU."""
    from bts.core import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(device, "enable_fast_kernels", lambda d: None)  # would touch the (absent) CUDA backend


def assert_generation_cache_free(model) -> None:
    """generate() with a KV cache equals generate() without, greedy, on a batch whose second row is left-padded."""
    ids = random_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    ids[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 15)
    assert torch.equal(cached, uncached)


def save_tiny_members(root, n: int = 2, names=("hub", "code", "math")):
    """A tiny hub and n experts saved as model folders (with the tiny tokenizer) under root/<name>."""
    tok = tiny_tokenizer()
    hub, experts = tiny_members(n=n, vocab_size=len(tok))
    for name, model in zip(names, (hub, *experts)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root
