"""Modularity: training only an added expert's slots moves nothing else, sparse inference is the full model at k = n
and really skips experts at k < n, the modularity mix is the run's stitch mix (stitch.domain_weights included), and
the gates, add-expert and remove-expert commands work. Adding and removing themselves: tests/core/test_surgery.py."""

from __future__ import annotations

import pytest
import torch
from helpers import open_stitches, random_ids, save_members, tiny_members

import bts  # noqa: F401
from bts import BTSError, BTSForCausalLM
from bts.core.surgery import add_expert, new_slot_masks, remove_expert
from bts.pipeline.modularity import train_stitches
from bts.train.config import TrainConfig
from bts.core.stitch import E2H


def _trained(n=3, init="blend", **kw):
    hub, experts = tiny_members("llama", n)
    names = [f"e{i}" for i in range(n)]
    return open_stitches(BTSForCausalLM.from_members(hub, experts, names=names, init=init, **kw).eval()), experts


# ---- training after adding -----------------------------------------------------------------------------------------
def test_training_only_new_slots_leaves_every_other_entry_bit_identical(tmp_path):
    model, experts = _trained(3)
    grown = add_expert(remove_expert(model, "e2"), experts[2], name="new")
    before = {k: v.clone() for k, v in grown.stitches.state_dict().items()}
    masks = new_slot_masks(grown, "new")
    ids = random_ids()
    cfg = TrainConfig(steps=3, lr=1e-2, warmup=1, batch_size=2, log_every=1, ckpt_every=10, weight_decay=0.1)
    train_stitches(grown, lambda step: [{"input_ids": ids, "labels": ids}], cfg, tmp_path / "t", only="new")
    after = grown.stitches.state_dict()
    moved = False
    for k, v in before.items():
        mask = masks.get(f"stitches.{k}")
        frozen = torch.ones_like(v, dtype=torch.bool) if mask is None else ~mask.bool()
        assert torch.equal(after[k][frozen], v[frozen]), k  # weight decay included: nothing old moved
        moved |= mask is not None and not torch.equal(after[k][mask.bool()], v[mask.bool()])
    assert moved
    assert all((s.presence >= 0).all() for s in grown.stitches if s.presence is not None)
    with torch.no_grad():
        assert (grown(ids).logits - remove_expert(grown, "new")(ids).logits).abs().max() > 1e-4


# ---- sparse inference -----------------------------------------------------------------------------------------------
def test_sparse_all_experts_is_the_full_model_exactly():
    model, _ = _trained(3)
    ids = random_ids()
    with torch.no_grad():
        full = model(ids).logits
        model.set_active_experts(["e2", "e0", "e1"])
        assert torch.equal(model(ids).logits, full)
        model.set_active_experts(model.top_experts(ids, k=3))
        assert torch.equal(model(ids).logits, full)


def test_sparse_skips_inactive_experts_and_generates_consistently():
    model, _ = _trained(3)
    calls = {m: 0 for m in range(4)}
    for m, member in enumerate(model.members()):
        layers = member.model.layers if m == 0 else member.layers
        for layer in layers:
            layer.register_forward_hook(lambda *_a, m=m: calls.__setitem__(m, calls[m] + 1))
    ids = random_ids()
    top = model.top_experts(ids, k=1)
    assert len(top) == 1
    for m in calls:
        calls[m] = 0
    model.set_active_experts(top)
    with torch.no_grad():
        sparse = model(ids).logits
    active = 1 + model.config.expert_names.index(top[0])
    assert calls[0] == 4 and calls[active] > 0
    assert all(calls[m] == 0 for m in (1, 2, 3) if m != active)  # never run: no compute, no KV cache
    reduced = model
    for name in set(model.config.expert_names) - set(top):  # sparse == the model with the others removed
        reduced = remove_expert(reduced, name)
    with torch.no_grad():
        assert (sparse - reduced(ids).logits).abs().max() <= 1e-5
    out_c = model.generate(ids, max_new_tokens=6, do_sample=False)
    out_n = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out_c, out_n)
    e2h = [g for g, k in zip(model.gate_values(ids, effective=True), model.config.stitch_kinds) if k == E2H]
    assert all(g.shape[-2] == 2 and (g.sum(-2) - 1).abs().max() <= 1e-5 for g in e2h)


def test_bad_sparse_inputs_are_bts_errors():
    model, _ = _trained(2)
    ids = random_ids()
    with pytest.raises(BTSError, match="'nope'"):
        model.set_active_experts(["nope"])
    with pytest.raises(BTSError, match="k must"):
        model.top_experts(ids, k=3)
    with pytest.raises(BTSError, match="k must"):
        model.top_experts(ids, k=0)
    with pytest.raises(BTSError):
        model.set_active_experts([])


def _word_tokenizer():
    """A word-level tokenizer inside the tiny vocabulary (the tiny members come without one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": 2 + i for i in range(1, 10)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# ---- commands -----------------------------------------------------------------------------------------------------
def test_cli_gates_add_remove(tmp_path):
    from bts.cli import main

    hub_dir, expert_dirs = save_members(tmp_path, n=3)
    model = open_stitches(BTSForCausalLM.from_members(hub_dir, expert_dirs[:2], names=["a", "b"]))
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "text.txt").write_text("w1 w2 w3 w1 w4")
    # the tiny members have no tokenizer: the gates command says so in one sentence
    assert main(["gates", str(tmp_path / "m"), str(tmp_path / "text.txt"), "--out", str(tmp_path / "g")]) == 2
    _word_tokenizer().save_pretrained(tmp_path / "m")
    assert main(["gates", str(tmp_path / "m"), str(tmp_path / "text.txt"), "--layer", "2", "--out", str(tmp_path / "g")]) == 0
    assert {"gates.json", "tokens.png", "layers.png", "gates.html"} <= {f.name for f in (tmp_path / "g").iterdir()}
    assert (tmp_path / "g" / "gates.html").read_text().count("<span title=") == 5
    assert main(["gates", str(tmp_path / "m"), "w1 w2", "--layer", "9", "--out", str(tmp_path / "g")]) == 2
    assert main(["add-expert", str(tmp_path / "m"), expert_dirs[2], "--name", "c", "--out", str(tmp_path / "m3")]) == 0
    assert main(["add-expert", str(tmp_path / "m"), expert_dirs[2], "--steps", "3", "--out", str(tmp_path / "x")]) == 2
    # an expert already in the model (same weights, other name) and --domain without a run are refused
    assert main(["add-expert", str(tmp_path / "m"), expert_dirs[0], "--name", "z", "--out", str(tmp_path / "x")]) == 2
    assert main(["add-expert", str(tmp_path / "m"), expert_dirs[2], "--domain", "d", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    assert main(["remove-expert", str(tmp_path / "m3"), "a", "--out", str(tmp_path / "m2")]) == 0
    assert main(["remove-expert", str(tmp_path / "m3"), "zz", "--out", str(tmp_path / "m4")]) == 2
    reduced = BTSForCausalLM.from_pretrained(tmp_path / "m2")
    assert reduced.config.expert_names == ["b", "c"]
    ids = random_ids()
    model.set_active_experts(["b"])
    with torch.no_grad():  # c enters with presence 0, so (b, c) after removing a is b alone
        assert (reduced(ids).logits - model(ids).logits).abs().max() <= 1e-4


def test_gates_command_writes_views(tmp_path):
    from bts.cli.commands import gates

    model, _ = _trained(2)
    ids = random_ids(1, 20)[0]
    mass = gates.token_gates(model, ids)
    assert mass.shape == (len(model.stitches), 20, 3)
    tokens = [f"t{i}" for i in range(20)]
    names = ["hub", "e0", "e1"]
    gates.plot(mass, tokens, names, 1, list(model.config.stitch_kinds), tmp_path)
    html = gates.to_html(mass[1], tokens, names, True, "t")
    assert (tmp_path / "tokens.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "layers.png").stat().st_size
    assert html.count("<span title=") == 20 and "e0" in html


def test_sparse_inference_sees_weight_updates_despite_its_row_cache():
    """Sparse inference keeps the active members' stitch rows between calls; an in-place update must refresh them."""
    model, _ = _trained(3)
    model.set_active_experts(["e1"])
    ids = random_ids()
    with torch.no_grad():
        model(ids)  # fills the row cache
        for p in model.stitch_parameters():
            p.mul_(0.5)
        cached = model(ids).logits
        for stitch in model.stitches:
            stitch.__dict__.pop("_row_cache", None)
        assert torch.equal(cached, model(ids).logits)


def test_sparse_table_scores_expert_domains_and_refuses_other_keys():
    from bts.eval.gates import sparse_table

    model, _ = _trained(2)
    windows = {"e0": random_ids(3, 8, seed=1), "other": random_ids(3, 8, seed=2)}
    table = sparse_table(model, windows)
    assert list(table) == ["e0"] and [r["k"] for r in table["e0"]["k"]] == [1, 2]
    assert abs(table["e0"]["k"][-1]["change_pct"]) < 1e-4  # k = n is the full model
    with pytest.raises(BTSError, match="expert names"):
        sparse_table(model, {"code": random_ids(3, 8)})


# ---- the modularity datamix is the run's stitch mix --------------------------------------------------------------
def test_modularity_mix_honours_stitch_domain_weights(tmp_path):
    from bts.pipeline.modularity import stitch_mix_for
    from bts.pipeline.recipe import load_recipe
    from bts.pipeline.run import Run

    run = Run(load_recipe("smoke", ["stitch.domain_weights={code: 3.0}"]), tmp_path)  # no data needed for a mix
    g = run.recipe.stitch.general_weight
    experts = list(run.recipe.expert_domains)
    mix = stitch_mix_for(run, experts)
    assert mix == run.stitch_mix()
    assert mix["code"] == pytest.approx(g / 4 + (1 - g) * 3 / 6) and mix["prose"] == pytest.approx(g / 4 + (1 - g) / 6)
    without = stitch_mix_for(run, [e for e in experts if e != "prose"])  # after removing an expert: weights kept
    assert without["code"] == pytest.approx(g / 4 + (1 - g) * 3 / 5) and without["prose"] == pytest.approx(g / 4)
    focused = stitch_mix_for(run, experts, focus="legal", focus_weight=0.5)  # built on the same mix
    assert focused == pytest.approx({d: 0.5 * w + (0.5 if d == "legal" else 0) for d, w in mix.items()})
    assert sum(focused.values()) == pytest.approx(1)
    with pytest.raises(BTSError, match="focus_weight"):
        stitch_mix_for(run, experts, focus="legal", focus_weight=1.0)
