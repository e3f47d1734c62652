"""Bad inputs to building / loading a stitched model: each is a BTSError whose one-sentence message names the field
and the offending values, raised before anything is written (checked through `bts build`, the save path)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_members, tiny_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import GPT2Config, GPT2LMHeadModel

from bts import BTSError, BTSForCausalLM
from bts.cli import build_parser


def _one_sentence(exc: BTSError, *needles: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and msg.rstrip().endswith("."), msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def _build(tmp_path, hub, experts, *extra, needles=()):
    """Run `bts build` and expect a BTSError; the output directory must not appear."""
    out = tmp_path / "out"
    args = build_parser().parse_args(["build", "--hub", str(hub), "--experts", *map(str, experts),
                                      "--out", str(out), *extra])
    with pytest.raises(BTSError) as info:
        args._run(args)
    _one_sentence(info.value, *needles)
    assert not out.exists()
    return info.value


def _pair(tmp_path, arch="llama", **expert_overrides):
    """A llama hub dir and one expert dir built with other settings."""
    tiny_model("llama").save_pretrained(tmp_path / "hub")
    tiny_model(arch, seed=1, **expert_overrides).save_pretrained(tmp_path / "odd")
    return tmp_path / "hub", tmp_path / "odd"


@pytest.mark.parametrize("field, arch, overrides, hub_value, expert_value", [
    ("model_type", "mistral", {}, "llama", "mistral"),
    ("hidden_size", "llama", {"hidden_size": 48}, "32", "48"),
    ("num_hidden_layers", "llama", {"num_hidden_layers": 3}, "4", "3"),
    ("vocab_size", "llama", {"vocab_size": 101}, "97", "101"),
])
def test_members_must_share_architecture(tmp_path, field, arch, overrides, hub_value, expert_value):
    hub, odd = _pair(tmp_path, arch, **overrides)
    _build(tmp_path, hub, [odd], needles=("'odd'", f"{field}={expert_value}", f"{field}={hub_value}"))


def _write_tokenizer(folder, words):
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    Tokenizer(WordLevel(vocab, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))


def test_members_must_share_tokenizer(tmp_path):
    hub, experts = save_members(tmp_path, "llama", 2)
    for folder in (hub, *experts):
        _write_tokenizer(tmp_path / folder, ["a", "b", "c"])
    BTSForCausalLM.from_members(hub, experts)  # same tokenizer everywhere: fine
    _write_tokenizer(tmp_path / experts[1], ["a", "b", "d"])
    _build(tmp_path, hub, experts, needles=("'e1'", "tokenizer", experts[1], hub))


@pytest.mark.parametrize("extra, needles", [
    (["--positions", "0,4"], ["positions", "1..4", "[0, 4]"]),
    (["--positions", "2,5"], ["positions", "1..4", "[2, 5]"]),
    (["--positions", "3,2"], ["positions", "[3, 2]"]),
    (["--positions", "2,2"], ["positions", "[2, 2]"]),
    (["--num-stitches", "0"], ["num_stitches", "4 layers", "got 0"]),
    (["--num-stitches", "5"], ["num_stitches", "4 layers", "got 5"]),
    (["--gate-dropout", "1.0"], ["gate_dropout", "1.0"]),
    (["--names", "a", "b", "c"], ["names", "3 names", "2 experts"]),
    (["--names", "hub", "b"], ["names must be unique", "'hub'"]),
])
def test_stitch_layout_and_options(tmp_path, extra, needles):
    hub, experts = save_members(tmp_path, "llama", 2)
    _build(tmp_path, hub, experts, *extra, needles=needles)


def test_api_only_options(tmp_path):
    hub, experts = save_members(tmp_path, "llama", 1)
    with pytest.raises(BTSError) as info:
        BTSForCausalLM.from_members(hub, [])
    _one_sentence(info.value, "experts", "n = 0")
    with pytest.raises(BTSError) as info:
        BTSForCausalLM.from_members(hub, experts, init="zero")
    _one_sentence(info.value, "init", "'zero'")
    with pytest.raises(BTSError) as info:
        BTSForCausalLM.from_members(hub, experts, expert_stream="both")
    _one_sentence(info.value, "expert_stream", "'both'")


def test_missing_and_unreadable_member_dirs(tmp_path):
    hub, experts = save_members(tmp_path, "llama", 1)
    _build(tmp_path, tmp_path / "nowhere", experts, needles=("hub", "nowhere", "not a model directory"))
    _build(tmp_path, hub, ["no-such/model"], needles=("expert 1", "'no-such/model'", "local cache"))
    (tmp_path / "empty").mkdir()
    _build(tmp_path, hub, [tmp_path / "empty"], needles=("expert 1", "empty", "config.json"))
    pickled = tmp_path / "pickled"  # a pickled-only checkpoint: bts reads safetensors only
    tiny_model("llama").config.save_pretrained(pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    _build(tmp_path, hub, [pickled], needles=("pickled", ".safetensors"))


def test_unsupported_architecture(tmp_path):
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    hub, experts = save_members(tmp_path, "llama", 1)
    _build(tmp_path, hub, [tmp_path / "gpt2"], needles=("model_type", "'gpt2'"))
    _build(tmp_path, tmp_path / "gpt2", experts, needles=("model_type", "'gpt2'"))
    with pytest.raises(BTSError) as info:
        BTSForCausalLM.from_members(GPT2LMHeadModel(cfg), [tiny_model("llama")])
    _one_sentence(info.value, "model_type", "'gpt2'")


def test_loading_a_folder_that_is_not_a_stitched_model(tmp_path):
    hub, experts = save_members(tmp_path, "llama", 1)
    with pytest.raises(BTSError) as info:
        BTSForCausalLM.from_pretrained(tmp_path / "nothing")
    _one_sentence(info.value, "nothing", "config.json")
    with pytest.raises(BTSError) as info:
        BTSForCausalLM.from_pretrained(hub)  # a plain member dir
    _one_sentence(info.value, "stitch.safetensors")

    BTSForCausalLM.from_members(hub, experts).save_pretrained(tmp_path / "saved")
    manifest = json.loads((tmp_path / "saved" / "config.json").read_text())["members"]
    assert [m["name"] for m in manifest] == ["hub", "e0"]
    (tmp_path / "e0").rename(tmp_path / "moved")
    with pytest.raises(BTSError) as info:
        BTSForCausalLM.from_pretrained(tmp_path / "saved")
    _one_sentence(info.value, "member 'e0'", "no longer exists")
