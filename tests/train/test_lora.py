"""LoRA experts (bts.train.lora): only adapters train, the merged model is the adapted model as a plain HF
checkpoint, B = 0 merges to the seed exactly, a target the model lacks is refused in one sentence."""

import pytest
import torch
from helpers import FAMILIES, VOCAB, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from bts import BTSError
from bts.data.streams import Batcher
from bts.train import lora
from bts.train.config import TrainConfig
from bts.train.loop import train


def batcher():
    gen = torch.Generator().manual_seed(0)
    return Batcher({"a": torch.randint(3, VOCAB, (2000,), generator=gen)}, {"a": 1.0}, seq_len=16, batch_size=4,
                   grad_accum=1, seed=3)


def cfg(**kw):
    return TrainConfig(**{**dict(steps=4, lr=5e-2, warmup=1, batch_size=4, log_every=1, ckpt_every=2), **kw})


def adapted(targets=("q_proj", "v_proj", "down_proj"), **kw):
    seed = tiny_model("llama")
    model = tiny_model("llama")
    wrapped, trainable = lora.add_adapters(model, r=4, alpha=8.0, targets=list(targets), seed=1, **kw)
    return seed, wrapped, trainable


def test_training_moves_only_the_adapters(tmp_path):
    seed, wrapped, trainable = adapted()
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    before = {k: p.detach().clone() for k, p in wrapped.named_parameters()}
    train(wrapped, trainable, batcher(), cfg(), tmp_path / "t")
    after = dict(wrapped.named_parameters())
    for k, p in after.items():
        if k in trainable:
            continue
        assert torch.equal(p, before[k]), k  # every base weight, embeddings and head included, is untouched
    assert all(not torch.equal(after[k], before[k]) for k in trainable if ".lora_B." in k)


def test_train_embeddings_trains_embeddings_and_head_in_full_next_to_the_adapters():
    _, wrapped, trainable = adapted(train_embeddings=True)
    full = [k for k in trainable if ".lora_" not in k]
    assert sorted(full) == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
    assert lora.lora_params(trainable) == sum(p.numel() for k, p in trainable.items() if k not in full)


def test_untrained_adapters_merge_to_the_seed_exactly(tmp_path):
    seed, wrapped, _ = adapted()
    merged = lora.merge_adapters(wrapped)
    assert type(merged) is LlamaForCausalLM
    assert merged.state_dict().keys() == seed.state_dict().keys()
    for k, v in seed.state_dict().items():
        assert torch.equal(merged.state_dict()[k], v), k


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: tied embeddings, biased q/k/v
def test_merged_checkpoint_is_a_plain_model_with_the_adapted_logits(tmp_path, arch):
    """In float64 the merge W + (alpha/r)·B·A is exact up to rounding: the tolerance is a few ulps of the logits."""
    model = tiny_model(arch).double()
    wrapped, trainable = lora.add_adapters(model, r=4, alpha=8.0, targets=lora.DEFAULT_TARGETS, seed=1)
    assert all(p.dtype == torch.float64 for p in trainable.values())
    train(wrapped, trainable, batcher(), cfg(), tmp_path / "t")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = wrapped(input_ids=ids).logits
        merged = lora.merge_adapters(wrapped)
        merged.save_pretrained(tmp_path / "expert")
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "expert", dtype=torch.float64)(input_ids=ids).logits
    seed_logits = tiny_model(arch).double()(input_ids=ids).logits
    assert (want - seed_logits).abs().max() > 1e-3  # the adapters did change the model
    tol = 1e3 * torch.finfo(torch.float64).eps * want.abs().max()
    assert (got - want).abs().max() <= tol
    names = {p.name for p in (tmp_path / "expert").iterdir()}
    assert not any("adapter" in n for n in names)  # an ordinary checkpoint, not a peft adapter folder


@pytest.mark.parametrize("arch", [f for f in FAMILIES if f != "phi3"])
def test_the_default_targets_fit_every_family_but_phi3(arch):
    lora.check_targets(tiny_config(arch), lora.DEFAULT_TARGETS)


@pytest.mark.parametrize("source", ["model", "config"])
def test_a_target_the_model_lacks_is_refused_in_one_sentence(source):
    target = tiny_model("phi3") if source == "model" else tiny_config("phi3")  # phi3 fuses qkv_proj
    with pytest.raises(BTSError) as err:
        lora.check_targets(target, ["o_proj", "q_proj"])
    msg = str(err.value)
    assert "'q_proj'" in msg and "qkv_proj" in msg and "experts.lora.targets" in msg and msg.count(". ") == 0
    lora.check_targets(target, ["qkv_proj", "o_proj", "gate_up_proj"])  # its own names pass, and dotted ones
    lora.check_targets(target, ["self_attn.qkv_proj", "mlp.down_proj"])
    with pytest.raises(BTSError, match="'mlp.qkv_proj'"):
        lora.check_targets(target, ["mlp.qkv_proj"])


def test_adapter_init_is_a_function_of_the_seed_and_leaves_the_global_generator_alone():
    tensors = []
    for draw in (123, 456):
        model = tiny_model("llama")
        torch.manual_seed(draw)
        state = torch.get_rng_state()
        _, trainable = lora.add_adapters(model, r=4, alpha=8.0, targets=["q_proj"], seed=1)
        assert torch.equal(torch.get_rng_state(), state)
        tensors.append(trainable)
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
