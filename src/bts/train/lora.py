"""LoRA continued pretraining for experts (peft): adapters on a copy of the seed, trained by the one loop, merged
back into the weights at the end, so that the saved expert is an ordinary Hugging Face *ForCausalLM.

    wrapped, trainable = add_adapters(seed_copy, r=8, alpha=16, targets=["q_proj", "v_proj"], seed=0)
    train(wrapped, trainable, batches, cfg, out_dir)      # only the adapter tensors (and maybe embeddings) move
    expert = merge_adapters(wrapped)                      # W + (alpha / r) · B A: a plain model, no peft inside

Every later stage (stitch, merges, BTX, evaluation) then sees a normal checkpoint. B starts at zero, so before
training the wrapped model is the seed, and so is the merged one (tests/train/test_lora.py).
"""

from __future__ import annotations

import warnings

import torch

from bts.errors import BTSError

# Every linear map of a decoder block in the Llama family's naming (and Mistral, Qwen, Gemma, OLMo, Granite).
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The modules peft can put adapters on; named by their last component, as peft's target_modules matches them.
_ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding)
# A LoRA expert's peak lr is this multiple of the full-training lr unless experts.lora.lr says otherwise: adapters
# start at B = 0 and move a low-rank update, so they want a larger step (measured on the demo: docs/lora.md).
LR_SCALE = 10.0


def adaptable_names(model: torch.nn.Module) -> list[str]:
    """The last name components of the model's modules that can take a LoRA adapter (q_proj, lm_head, …)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, _ADAPTABLE)})


def check_targets(model_or_config, targets: list[str], where: str = "experts.lora.targets") -> None:
    """Refuse, in one sentence, a target the model does not have. A config is built on the meta device (no
    weights are allocated), so this is cheap enough to run before anything is written."""
    model = model_or_config
    if not isinstance(model, torch.nn.Module):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_or_config)
    names = [name for name, m in model.named_modules() if name and isinstance(m, _ADAPTABLE)]
    have = adaptable_names(model)
    for t in targets:  # peft's rule: a module matches when its name is the target or ends with "." + target
        if not any(name == t or name.endswith("." + t) for name in names):
            raise BTSError(f"{where} names '{t}', which this {type(model).__name__} does not have "
                           f"(its linear and embedding modules: {', '.join(have)}).")


def add_adapters(model: torch.nn.Module, *, r: int, alpha: float, targets: list[str], dropout: float = 0.0,
                 train_embeddings: bool = False, seed: int = 0):
    """(peft model wrapping `model` in place, {name: tensor} it trains). The adapters' A matrices are drawn from a
    generator seeded with `seed`, so an interrupted run rebuilds the same starting point. train_embeddings: the
    input embeddings and the LM head train in full next to the adapters (they stay ordinary weights: nothing to
    merge)."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, bias="none")
    state = torch.get_rng_state()
    torch.manual_seed(seed)  # peft draws A with the global generator: make it the caller's seed, then restore
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            wrapped = get_peft_model(model, config)
    finally:
        torch.set_rng_state(state)
    if train_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            module.weight.requires_grad_(True)
    trainable = {k: p for k, p in wrapped.named_parameters() if p.requires_grad}
    return wrapped, trainable


def merge_adapters(wrapped) -> torch.nn.Module:
    """The base model with every adapter folded into its weights (W + scale · B A) and the peft layers removed."""
    merged = wrapped.merge_and_unload()
    merged.eval()
    return merged


def lora_params(trainable: dict) -> int:
    """How many of the trained tensors' elements are adapter weights (the rest: embeddings / head, if trained)."""
    return sum(p.numel() for k, p in trainable.items() if ".lora_" in k)
