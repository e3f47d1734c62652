"""`bts plan RECIPE`: the capacity plan of a recipe's own run, offline — its hub's shape (the cached model's
config, else the config bts ships for that hub id, else the tiny seed the recipe pretrains), its number of
experts, its sequence length, micro-batch and stitch layout.

    plan = recipe_plan(load_recipe("qwen2.5-1.5b-code-math"), gpus=1)
    print(format_plan(plan))
"""

from __future__ import annotations

from bts.core.plan import make_plan
from bts.core.shipped import member_config
from bts.errors import BTSError
from bts.pipeline.recipe import Recipe


def hub_config(recipe: Recipe):
    """(config, where it came from) of the recipe's hub, reading no weights."""
    seed = recipe.seed_model
    if seed.path:
        return member_config(seed.path, "seed_model.path")
    from transformers import LlamaConfig

    # The tiny Llama the seed stage pretrains (bts.pipeline.stages.seed), at the recipe's tokenizer size.
    config = LlamaConfig(vocab_size=recipe.tokenizer.vocab_size, hidden_size=seed.hidden_size,
                         num_hidden_layers=seed.num_layers, num_attention_heads=seed.num_heads,
                         num_key_value_heads=seed.num_kv_heads, intermediate_size=seed.intermediate_size,
                         max_position_embeddings=max(512, recipe.data.seq_len), tie_word_embeddings=False)
    return config, "the seed the recipe pretrains"


def recipe_plan(recipe: Recipe, *, gpus: int = 1, gpu_mem_gib: float = 80.0) -> dict:
    """make_plan for the recipe's hub shape with its experts, data.seq_len, stitch micro-batch and layout."""
    config, where = hub_config(recipe)
    s, t = recipe.stitch, recipe.stitch.train
    experts = len(recipe.expert_domains)
    if experts < 1:
        raise BTSError(f"recipe '{recipe.name}' has no experts to plan for (experts.domains and data.domains).")
    label = f"recipe {recipe.name}: hub {recipe.seed_model.path or 'tiny llama seed'} from {where}"
    plan = make_plan(config, experts=experts, gpus=gpus, gpu_mem_gib=gpu_mem_gib, seq=recipe.data.seq_len,
                     micro_batch=t.batch_size // t.grad_accum, stitches=len(s.positions) or s.num_stitches,
                     checkpoint_members=s.checkpoint_members, label=label)
    plan["attention_flops"] = plan["phases"][0].flops_attention  # one member's, as format_plan says
    plan["phases"] = [ph for ph in plan["phases"] if _runs(recipe, ph.name)]  # only what this recipe runs
    return plan


def _runs(recipe: Recipe, phase: str) -> bool:
    methods = recipe.baselines.methods
    trained = [d for d in recipe.expert_domains if d not in recipe.experts.paths]
    if phase.startswith("seed"):
        return not recipe.seed_model.path
    if phase.startswith("expert"):
        return bool(trained)
    if phase.startswith("BAM adapters"):
        return "bam_adapters" in methods
    if phase.startswith("BAM"):
        return "bam" in methods
    if phase.startswith("BTX"):
        return any(m.startswith("btx") for m in methods)
    return True  # stitch training and inference
