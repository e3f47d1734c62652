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
    seed, _, stitch, infer = plan["phases"][:4]
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


def test_bam_rows_reproduce_table2(paper_seed):
    """The paper's Table 2 for the 2.7B seed with 3 experts: BAM 8.40B total and trained; BAM adapters 1.5B trained
    (9.9B total). Soft routing runs every expert, so active = total."""
    from bts.baselines.bam import bam_counts_of
    from transformers import AutoConfig

    bam, adapters = make_plan(str(paper_seed), experts=3)["phases"][4:]
    assert (bam.name, adapters.name) == ("BAM training", "BAM adapters training")
    assert f"{bam.total / 1e9:.2f}" == "8.40" and bam.trainable == bam.active == bam.total
    assert f"{adapters.trainable / 1e9:.2f}" == "1.51" and f"{adapters.total / 1e9:.2f}" == "9.91"
    assert adapters.active == adapters.total
    assert adapters.total - bam.total == adapters.trainable - 20 * 2 * 4 * 3072 == 20 * 4 * 2 * 3072**2
    # The closed form from the Arch equals the one bts.baselines.bam computes from the members' config.
    base = AutoConfig.from_pretrained(paper_seed)
    assert bam.total == bam_counts_of(base, 4)["total"]
    assert adapters.trainable == bam_counts_of(base, 4, adapters=True)["trainable"]
    # Memory: BAM trains every weight (16 bytes each under DDP), adapters only routers and adapters.
    ddp = bam.memory["ddp"]
    assert ddp["weights"] + ddp["grads"] + ddp["optimizer"] == 16 * bam.total
    assert adapters.memory["ddp"]["grads"] == 2 * adapters.trainable
    assert bam.grad_layers == 20 * 4  # every member's layer of every block keeps activations


def test_memory_bookkeeping(paper_seed):
    plan = make_plan(str(paper_seed), experts=3, gpus=4, gpu_mem_gib=40)
    seed, _, stitch, _ = plan["phases"][:4]
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
    assert "BAM training                                8.40B     8.40B    8.40B" in out
    assert "BAM adapters training                       9.91B     1.51B    9.91B" in out
    assert main(["plan", str(paper_seed), "--experts", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stitch_params_paper"] == 4 * 5 * 3072**2 and len(data["phases"]) == 6
    assert [p["name"] for p in data["phases"][4:]] == ["BAM training", "BAM adapters training"]


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
