"""Weight merges: hand-checked arithmetic, invariants, mergekit 0.1.5 cross-checks, tied embeddings, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import VOCAB, save_members, tiny_members, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bts.baselines.merges import METHODS, merge_models, merge_state_dicts, resolve_params, save_merged
from bts.cli import main
from bts.errors import BTSError


def close(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


# ------------------------------------------------------------------- arithmetic on hand-made tensors


def test_ties_by_hand():
    seed = {"w": torch.zeros(4)}
    t1 = {"w": torch.tensor([3.0, -1.0, 0.5, 2.0])}
    t2 = {"w": torch.tensor([-1.0, -2.0, 0.4, -0.1])}
    # density 0.5 keeps 2 of 4: t1 -> [3, 0, 0, 2], t2 -> [-1, -2, 0, 0]; summed [2, -2, 0, 2] elects [+, -, +, +]
    # agreeing entries: [3 | -2 | none | 2]; disjoint mean -> [3, -2, 0, 2]
    out = merge_state_dicts(seed, [t1, t2], "ties", density=0.5)
    assert torch.equal(out["w"], torch.tensor([3.0, -2.0, 0.0, 2.0]))
    # without normalize the agreeing entries are summed, then scaled by λ
    t3 = {"w": torch.tensor([1.0, 0.0, 0.0, 1.0])}
    out = merge_state_dicts(seed, [t1, t3], "ties", density=0.5, normalize=False, lam=0.5)
    assert torch.equal(out["w"], torch.tensor([2.0, 0.0, 0.0, 1.5]))


def test_ties_elects_plus_on_a_zero_sum():
    seed = {"w": torch.ones(1)}
    out = merge_state_dicts(seed, [{"w": torch.tensor([2.0])}, {"w": torch.tensor([0.0])}], "ties", density=1.0)
    assert torch.equal(out["w"], torch.tensor([2.0]))  # τ = [+1, -1]: sum 0 elects +, only +1 agrees


def test_task_arithmetic_and_soup_by_hand():
    seed, a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([1.0, 5.0])}
    assert torch.equal(merge_state_dicts(seed, [a, b], "task_arithmetic")["w"], torch.tensor([2.0, 5.0]))
    assert torch.equal(merge_state_dicts(seed, [a, b], "task_arithmetic", lam=0.5)["w"], torch.tensor([1.5, 3.5]))
    assert torch.equal(merge_state_dicts(seed, [a, b], "task_arithmetic", normalize=True)["w"],
                       torch.tensor([1.5, 3.5]))
    assert torch.allclose(merge_state_dicts(seed, [a, b], "soup")["w"], torch.tensor([4 / 3, 3.0]))


@pytest.mark.parametrize("method", METHODS)
def test_identical_members_return_the_seed(method):
    hub, _ = tiny_members("llama", 0)
    sd = hub.state_dict()
    out = merge_state_dicts(sd, [sd, sd], method)
    close(out, sd, atol=1e-7 if method == "soup" else 0.0)  # soup divides (x+x+x) by 3: one rounding step


def test_soup_of_seed_and_one_expert_is_the_mean():
    hub, (e,) = tiny_members("llama", 1)
    out = merge_state_dicts(hub.state_dict(), [e.state_dict()], "soup")
    close(out, {k: (v + e.state_dict()[k]) / 2 for k, v in hub.state_dict().items()}, atol=1e-7)


def test_ties_at_full_density_with_one_expert_is_task_arithmetic():
    hub, (e,) = tiny_members("llama", 1)
    ties = merge_state_dicts(hub.state_dict(), [e.state_dict()], "ties", density=1.0)
    ta = merge_state_dicts(hub.state_dict(), [e.state_dict()], "task_arithmetic", lam=1.0)
    close(ties, ta)
    close(ta, e.state_dict(), atol=1e-6)  # θ_seed + (θ_e − θ_seed)


def test_ties_trim_keeps_the_density_fraction():
    seed = {"w": torch.zeros(1000)}
    tau = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(0))}
    out = merge_state_dicts(seed, [tau], "ties", density=0.3)["w"]
    kept = out != 0
    assert kept.sum() == 300
    assert out[kept].abs().min() >= tau["w"][~kept].abs().max()  # the largest magnitudes survive
    assert torch.equal(out[kept], tau["w"][kept])  # unscaled: one expert agrees with itself


def test_dare_keeps_about_one_minus_p_and_rescales_exactly():
    n, p = 200_000, 0.7
    seed = {"w": torch.zeros(n)}
    tau = {"w": torch.randn(n, generator=torch.Generator().manual_seed(1))}
    out = merge_state_dicts(seed, [tau], "dare_linear", drop_rate=p, random_seed=3)["w"]
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005  # ±5 standard deviations
    assert torch.allclose(out[kept], tau["w"][kept] / (1 - p), rtol=1e-6, atol=0)


def test_dare_is_seeded_and_independent_of_tensor_order():
    hub, experts = tiny_members("llama", 2)
    sds = [e.state_dict() for e in experts]
    a = merge_state_dicts(hub.state_dict(), sds, "dare_ties", drop_rate=0.5, random_seed=7)
    reversed_seed = dict(reversed(list(hub.state_dict().items())))
    b = merge_state_dicts(reversed_seed, sds, "dare_ties", drop_rate=0.5, random_seed=7)
    c = merge_state_dicts(hub.state_dict(), sds, "dare_ties", drop_rate=0.5, random_seed=8)
    close(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_dare_without_dropping_is_task_arithmetic_or_untrimmed_ties():
    hub, experts = tiny_members("llama", 3)
    seed, sds = hub.state_dict(), [e.state_dict() for e in experts]
    close(merge_state_dicts(seed, sds, "dare_linear", drop_rate=0.0, lam=0.8),
          merge_state_dicts(seed, sds, "task_arithmetic", lam=0.8))
    close(merge_state_dicts(seed, sds, "dare_ties", drop_rate=0.0),
          merge_state_dicts(seed, sds, "ties", density=1.0, normalize=False))


def test_non_float_tensors_come_from_the_seed_and_dtype_is_kept():
    seed = {"ids": torch.arange(5), "w": torch.ones(3, dtype=torch.bfloat16)}
    other = {"ids": torch.arange(5) + 10, "w": torch.full((3,), 3.0, dtype=torch.bfloat16)}
    for method in METHODS:
        out = merge_state_dicts(seed, [other], method)
        assert torch.equal(out["ids"], seed["ids"]) and out["ids"] is not seed["ids"]
        assert out["w"].dtype == torch.bfloat16


def test_tied_names_stay_tied_in_a_state_dict():
    hub, experts = tiny_members("qwen2", 2)
    sd = hub.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    out = merge_state_dicts(sd, [e.state_dict() for e in experts], "dare_linear")
    assert out["lm_head.weight"] is out["model.embed_tokens.weight"]


# ------------------------------------------------------------------- validation


@pytest.mark.parametrize("method, params, field", [
    ("ties", {"density": 0.0}, "density=0.0"),
    ("ties", {"density": 1.5}, "density=1.5"),
    ("dare_ties", {"drop_rate": 1.0}, "drop_rate=1.0"),
    ("dare_linear", {"drop_rate": -0.1}, "drop_rate=-0.1"),
    ("task_arithmetic", {"lam": 0.0}, "lambda=0.0"),
    ("ties", {"lam": -1.0}, "lambda=-1.0"),
    ("dare_linear", {"lam": math.nan}, "lambda=nan"),
    ("soup", {"lam": 0.5}, "lambda=0.5"),
    ("task_arithmetic", {"density": 0.5}, "density=0.5"),
    ("ties", {"drop_rate": 0.5}, "drop_rate=0.5"),
    ("dare_linear", {"random_seed": 1.5}, "random_seed=1.5"),
    ("ties", {"normalize": "yes"}, "normalize=yes"),
    ("slerp", {}, "slerp"),
])
def test_bad_settings_are_user_errors_naming_the_value(method, params, field):
    with pytest.raises(BTSError, match=f"^{field}|'{field}'"):
        resolve_params(method, **params)


def test_defaults_follow_mergekit_and_the_papers():
    assert resolve_params("task_arithmetic") == {"method": "task_arithmetic", "lam": 1.0, "normalize": False}
    assert resolve_params("ties") == {"method": "ties", "lam": 1.0, "normalize": True, "density": 0.2}
    assert resolve_params("dare_ties")["normalize"] is False and resolve_params("dare_linear")["drop_rate"] == 0.5


def test_shape_and_key_mismatches_are_user_errors():
    seed = {"w": torch.zeros(3), "b": torch.zeros(2)}
    with pytest.raises(BTSError, match="expert 0 tensor 'w' has shape \\(4,\\)"):
        merge_state_dicts(seed, [{"w": torch.zeros(4), "b": torch.zeros(2)}], "soup")
    with pytest.raises(BTSError, match="expert 1 has no tensor 'b'"):
        merge_state_dicts(seed, [seed, {"w": torch.zeros(3)}], "soup")
    with pytest.raises(BTSError, match="at least one expert"):
        merge_state_dicts(seed, [], "soup")


def test_mismatched_members_are_refused(tmp_path):
    hub, (e0, _) = save_members(tmp_path, "llama", 2)
    wide = tiny_model("llama", intermediate_size=48)
    with pytest.raises(BTSError, match="has shape"):
        merge_models(hub, [e0, wide], "soup")
    with pytest.raises(BTSError, match="hidden_size=48"):
        merge_models(hub, [tiny_model("llama", hidden_size=48)], "soup")
    with pytest.raises(BTSError, match="tie_word_embeddings=True"):
        merge_models(hub, [tiny_model("llama", tie_word_embeddings=True)], "soup")


# ------------------------------------------------------------------- models, saving, loading


def test_merge_models_on_tied_qwen2_saves_loads_and_generates(tmp_path):
    hub, experts = save_members(tmp_path, "qwen2", 2)
    merged = merge_models(hub, experts, "ties", density=0.5)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    # The same numbers as merging the state dicts directly (the expert files are streamed, not loaded).
    loaded = [AutoModelForCausalLM.from_pretrained(p) for p in [hub, *experts]]
    ref = merge_state_dicts(loaded[0].state_dict(), [m.state_dict() for m in loaded[1:]], "ties", density=0.5)
    close(merged.state_dict(), ref)
    save_merged(merged, hub, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(back) is type(merged) and back.lm_head.weight is back.model.embed_tokens.weight
    close(back.state_dict(), merged.state_dict())
    out = back.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7) and int(out.max()) < VOCAB
    info = json.loads((tmp_path / "out" / "bts_merge.json").read_text())
    assert info["method"] == "ties" and info["density"] == 0.5 and len(info["experts"]) == 2


def test_in_memory_seed_is_not_modified_and_dtype_follows_the_seed(tmp_path):
    hub, experts = tiny_members("llama", 2)
    before = {k: v.clone() for k, v in hub.state_dict().items()}
    merged = merge_models(hub, experts, "task_arithmetic")
    close(hub.state_dict(), before)
    assert merged is not hub
    hub.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for i, e in enumerate(experts):
        e.save_pretrained(tmp_path / f"e{i}")
    out = merge_models(tmp_path / "bf16", [tmp_path / "e0", tmp_path / "e1"], "soup")
    assert out.dtype == torch.bfloat16


# ------------------------------------------------------------------- against mergekit 0.1.5


def run_mergekit(tmp_path, name, cfg):
    mk_config = pytest.importorskip("mergekit.config")
    mk_merge = pytest.importorskip("mergekit.merge")
    out = tmp_path / name
    mk_merge.run_merge(mk_config.MergeConfiguration.model_validate({**cfg, "dtype": "float32"}), str(out),
                       options=mk_merge.MergeOptions(device="cpu", random_seed=0, quiet=True))
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_matches_mergekit_linear_task_arithmetic_and_ties(tmp_path, arch):
    pytest.importorskip("mergekit")
    hub, experts = save_members(tmp_path, arch, 3)
    ours = lambda method, **kw: merge_models(hub, experts, method, **kw).state_dict()  # noqa: E731

    def check(mk, mine, atol):
        assert mk.keys() <= mine.keys()
        for k, v in mk.items():
            assert torch.allclose(v, mine[k], atol=atol, rtol=0), (k, (v - mine[k]).abs().max())

    linear = run_mergekit(tmp_path, "linear", {
        "merge_method": "linear", "models": [{"model": p, "parameters": {"weight": 1.0}} for p in [hub, *experts]]})
    check(linear, ours("soup"), 1e-6)
    for lam in (1.0, 0.6):
        ta = run_mergekit(tmp_path, f"ta{lam}", {
            "merge_method": "task_arithmetic", "base_model": hub, "parameters": {"lambda": lam},
            "models": [{"model": p, "parameters": {"weight": 1.0}} for p in experts]})
        check(ta, ours("task_arithmetic", lam=lam), 1e-6)
    for density, normalize in ((0.5, True), (0.3, False)):
        ties = run_mergekit(tmp_path, f"ties{density}", {
            "merge_method": "ties", "base_model": hub, "parameters": {"normalize": normalize, "lambda": 0.9},
            "models": [{"model": p, "parameters": {"weight": 1.0, "density": density}} for p in experts]})
        check(ties, ours("ties", density=density, normalize=normalize, lam=0.9), 1e-6)


def test_dare_agrees_with_mergekit_in_distribution(tmp_path):
    """mergekit rescales DARE survivors to keep each τ's L1 norm (1/(1−p) in expectation); ours is exactly 1/(1−p).
    Masks differ (different random streams), so compare kept fractions and mean absolute deltas."""
    pytest.importorskip("mergekit")
    hub, (e0,) = save_members(tmp_path, "llama", 1)
    mk = run_mergekit(tmp_path, "dare", {
        "merge_method": "dare_linear", "base_model": hub,
        "models": [{"model": e0, "parameters": {"weight": 1.0, "density": 0.4}}]})
    mine = merge_models(hub, [e0], "dare_linear", drop_rate=0.6).state_dict()
    seed = load_file(f"{hub}/model.safetensors")
    for k in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        d_mk, d_mine = mk[k] - seed[k], mine[k] - seed[k]
        assert abs((d_mk != 0).float().mean() - (d_mine != 0).float().mean()) < 0.03
        assert torch.isclose(d_mk.abs().mean(), d_mine.abs().mean(), rtol=0.05)


# ------------------------------------------------------------------- the CLI


def add_tokenizer(model_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(VOCAB - 4)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(model_dir)


def test_cli_writes_a_loadable_model_with_the_seed_tokenizer(tmp_path, capsys):
    hub, experts = save_members(tmp_path, "llama", 2)
    add_tokenizer(hub)
    out = tmp_path / "merged"
    argv = ["merge", "--method", "dare_ties", "--seed", hub, "--experts", *experts, "--out", str(out),
            "--drop-rate", "0.3", "--lambda", "0.8", "--random-seed", "5"]
    assert main(argv) == 0
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "hub" / "tokenizer.json").read_bytes()
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(out)("w1 w2 w3", return_tensors="pt").input_ids
    AutoModelForCausalLM.from_pretrained(out).generate(ids, max_new_tokens=2, do_sample=False)
    first = load_file(out / "model.safetensors")

    # A non-empty out is refused without --force and left untouched; --force rewrites it identically (seeded).
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0
    close(load_file(out / "model.safetensors"), first)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


@pytest.mark.parametrize("extra, message", [
    (["--density", "0"], "density=0.0"),
    (["--density", "0.5", "--method", "soup"], "density=0.5 is not used"),
])
def test_cli_errors_write_nothing(tmp_path, capsys, extra, message):
    hub, experts = save_members(tmp_path, "llama", 1)
    out = tmp_path / "merged"
    assert main(["merge", "--method", "ties", "--seed", hub, "--experts", *experts, "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_mismatch_and_self_overwrite_write_nothing(tmp_path, capsys):
    hub, experts = save_members(tmp_path, "llama", 1)
    tiny_model("llama", intermediate_size=48).save_pretrained(tmp_path / "wide")
    out = tmp_path / "merged"
    assert main(["merge", "--method", "soup", "--seed", hub, "--experts", *experts, str(tmp_path / "wide"),
                 "--out", str(out)]) == 2
    assert "has shape" in capsys.readouterr().err and not out.exists()
    assert main(["merge", "--method", "soup", "--seed", hub, "--experts", *experts, "--out", hub, "--force"]) == 2
    assert "member directory" in capsys.readouterr().err
    assert (tmp_path / "hub" / "model.safetensors").exists()
