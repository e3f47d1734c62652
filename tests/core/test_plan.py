"""`bts plan`: exact counts against the paper's own numbers, memory bookkeeping invariants, CLI and errors."""

import json

import pytest
from transformers import LlamaConfig

from bts.cli import main
from bts.errors import BTSError
from bts.core.plan import GIB, make_plan


@pytest.fixture(scope="module")
def paper_seed(tmp_path_factory):
    """The paper's 2.7B seed as docs/method.md §4 reconciles it: Llama, L=20, d=3072, SwiGLU 8192, 24 heads, 1 KV
    head, vocab 128256, untied embeddings. Only config.json is written."""
    path = tmp_path_factory.mktemp("paper")
    LlamaConfig(vocab_size=128256, hidden_size=3072, num_hidden_layers=20, intermediate_size=8192,
                num_attention_heads=24, num_key_value_heads=1, tie_word_embeddings=False).save_pretrained(path)
    return path


def test_paper_numbers(paper_seed):
    plan = make_plan(str(paper_seed / "config.json"), experts=3, stitches=4)
    assert plan["stitch_params_paper"] == 264_241_152  # "BTS training params 264M"
    seed, _, stitch, infer = plan["phases"]
    assert seed.total == 2_691_296_256  # "seed 2.7B"
    assert stitch.total == 4 * seed.total + plan["stitch_params"]
    assert 10.9e9 < stitch.total < 11.1e9  # "11B total"
    # As built, the blend vectors add d per E→H and n·d per H→E layer on top of the paper's count.
    assert plan["stitch_params"] - plan["stitch_params_paper"] == 2 * 3072 + 2 * 3 * 3072
    assert stitch.trainable == plan["stitch_params"] and infer.trainable == 0
    # docs/method.md §4: ≈16.5 GFLOPs/token for BTS against 4.6 for the seed, ≈0.5 of it in the stitch layers.
    assert seed.flops_members / 1e9 == pytest.approx(4.6, abs=0.05)
    assert (stitch.flops_members + stitch.flops_stitch) / 1e9 == pytest.approx(16.5, abs=0.1)
    assert stitch.flops_stitch == 2 * 264_241_152


def test_memory_bookkeeping(paper_seed):
    plan = make_plan(str(paper_seed), experts=3, gpus=4, gpu_mem_gib=40)
    seed, _, stitch, _ = plan["phases"]
    ddp, fsdp = seed.memory["ddp"], seed.memory["fsdp2"]
    assert ddp["weights"] + ddp["grads"] + ddp["optimizer"] == 16 * seed.total  # 16 bytes per trained parameter
    assert fsdp["optimizer"] == pytest.approx(ddp["optimizer"] / 4)
    assert fsdp["activations"] == ddp["activations"]  # sharding does not split activations
    assert stitch.memory["ddp"]["grads"] == 2 * stitch.trainable  # frozen members carry no gradients
    for ph in plan["phases"]:
        for mode, m in ph.memory.items():
            assert ph.fits[mode] == (m["total"] <= 40 * GIB)
    longer = make_plan(str(paper_seed), experts=3, seq=8192)
    assert longer["phases"][0].memory["ddp"]["activations"] == pytest.approx(
        2 * plan["phases"][0].memory["ddp"]["activations"])


def test_cli_text_and_json(paper_seed, capsys):
    assert main(["plan", str(paper_seed), "--experts", "3", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "264,241,152" in out and "stitch training" in out and "fsdp2" in out
    assert main(["plan", str(paper_seed), "--experts", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stitch_params_paper"] == 4 * 5 * 3072**2 and len(data["phases"]) == 4


@pytest.mark.parametrize("args,match", [(["--experts", "0"], "--experts"), (["--stitches", "21", "--experts", "1"],
                                                                            "--stitches"),
                                        (["--gpu-mem", "0", "--experts", "1"], "--gpu-mem")])
def test_bad_arguments(paper_seed, capsys, args, match):
    assert main(["plan", str(paper_seed), *args]) == 2
    assert match in capsys.readouterr().err


def test_missing_config(tmp_path):
    with pytest.raises(BTSError, match="CONFIG_OR_MODEL"):
        make_plan(str(tmp_path / "nope"), experts=1)
    with pytest.raises(BTSError, match="no config.json"):
        make_plan(str(tmp_path), experts=1)


def test_shipped_shapes_plan_by_name(paper_seed):
    """`bts plan paper-2.7b` and `bts plan llama-3.1-8b` need no config of the user's (docs/distributed.md)."""
    shipped = make_plan("paper-2.7b", experts=3, stitches=4)
    assert shipped["stitch_params_paper"] == make_plan(str(paper_seed), experts=3, stitches=4)["stitch_params_paper"]
    assert shipped["phases"][0].total == 2_691_296_256
    assert make_plan("llama-3.1-8b", experts=3)["phases"][0].total == 8_030_261_248  # Llama-3.1-8B's count


def test_checkpointed_stitch_training_keeps_less_and_changes_nothing_else():
    plain = make_plan("llama-3.1-8b", experts=3)
    ckpt = make_plan("llama-3.1-8b", experts=3, checkpoint_members=True)
    for a, b in zip(plain["phases"], ckpt["phases"]):
        if a.name == "stitch training":
            assert b.memory["fsdp2"]["activations"] < a.memory["fsdp2"]["activations"] / 4
            assert {k: v for k, v in b.memory["fsdp2"].items() if k not in ("activations", "total")} == \
                {k: v for k, v in a.memory["fsdp2"].items() if k not in ("activations", "total")}
        else:
            assert a.memory == b.memory
