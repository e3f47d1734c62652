"""`--device` / `--members-dtype` on every computing command: CUDA asked for where there is none is one sentence,
exit 2, with nothing written; a GPU that torch reports is really used (never a silent CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY, fake_gpus, save_members, tiny_model, tiny_tokenizer

from bts.cli import main
from bts.eval.downstream import lmeval
from bts.eval.downstream.tasks import FIXTURES

CUDA_MISSING = "Torch not compiled with CUDA enabled"



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny members and a stitched model over them (read only by the tests)."""
    from bts import BTSForCausalLM

    root = tmp_path_factory.mktemp("models")
    hub, experts = save_members(root, "llama", 2)
    BTSForCausalLM.from_members(hub, experts[:1], num_stitches=2).save_pretrained(root / "stitched")
    tok = tiny_tokenizer()
    tiny_model(vocab_size=len(tok), max_position_embeddings=512).save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")  # a model with a tokenizer, to score
    return {"hub": hub, "e0": experts[0], "e1": experts[1], "stitched": str(root / "stitched"), "lm": str(root / "lm")}


def commands(m: dict, out: str, device: str) -> dict:
    """One command line per computing command, asking for `device`, writing under `out`."""
    return {
        "run (recipe key)": ["run", "smoke", *TINY, f"device={device}", "--run-dir", out],
        "run": ["run", "smoke", *TINY, "--device", device, "--run-dir", out],
        "demo": ["demo", "--recipe", "smoke", "--device", device, "--run-dir", out],
        "eval": ["eval", m["hub"], "--tasks", "mmlu_math", "--limit", "1", "--out", out, "--data-dir", str(FIXTURES),
                 "--device", device],
        "merge": ["merge", "--method", "soup", "--seed", m["hub"], "--experts", m["e0"], "--out", out,
                  "--device", device],
        "btx": ["btx", "--seed", m["hub"], "--experts", m["e0"], "--out", out, "--device", device],
        "build": ["build", "--hub", m["hub"], "--experts", m["e0"], "--out", out, "--device", device],
        "gates": ["gates", m["stitched"], "some text to read", "--out", out, "--device", device],
        "add-expert": ["add-expert", m["stitched"], m["e1"], "--out", out, "--device", device],
        "remove-expert": ["remove-expert", m["stitched"], "e0", "--out", out, "--device", device],
        "lm-eval": ["lm-eval", "--model", "hf", "--model_args", f"pretrained={m['hub']}", "--tasks", "bts_mmlu_math",
                    "--output_path", out, "--device", device],
    }


NAMES = list(commands({"hub": "", "e0": "", "e1": "", "stitched": ""}, "", "cuda"))


@pytest.mark.parametrize("name", NAMES)
def test_cuda_where_there_is_none_is_one_sentence_and_writes_nothing(monkeypatch, capsys, tmp_path, models, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    argv = commands(models, str(out), "cuda")[name]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("bts: error: ") and err.endswith("."), err
    assert "is 'cuda' but torch" in err and "sees no CUDA GPU on this machine" in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv_tail, needle", [
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N (got 'gpu')"),
    (["--members-dtype", "fp8"], "--members-dtype must be one of auto, float32, bfloat16, float16 (got 'fp8')"),
])
def test_misspelt_device_options_are_one_sentence(capsys, tmp_path, models, argv_tail, needle):
    out = tmp_path / "out"
    argv = ["eval", models["hub"], "--tasks", "mmlu_math", "--limit", "1", "--out", str(out),
            "--data-dir", str(FIXTURES), *argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not out.exists()


def test_recipe_override_wins_through_the_option(capsys, tmp_path):
    """`--device` on `bts run` is the recipe's `device` key: the recipe check words a misspelling."""
    assert main(["run", "smoke", *TINY, "--device", "tpu", "--run-dir", str(tmp_path / "r")]) == 2
    assert "device must be auto, cpu, cuda or cuda:N (got 'tpu')" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bts_eval_uses_a_reported_gpu(monkeypatch, tmp_path, models):
    """No --device and a GPU reported: the model is read onto cuda:0 (torch's CUDA error on this CPU-only build)."""
    fake_gpus(monkeypatch)
    with pytest.raises(AssertionError, match=CUDA_MISSING):
        main(["eval", models["hub"], "--tasks", "mmlu_math", "--limit", "1", "--out", str(tmp_path / "out"),
              "--data-dir", str(FIXTURES)])


def test_bts_eval_reads_a_stitched_model_onto_a_reported_gpu(monkeypatch, capsys, tmp_path, models):
    """Its members are read onto cuda:0 (the member loader words torch's CUDA error as one sentence)."""
    fake_gpus(monkeypatch)
    assert main(["eval", models["stitched"], "--tasks", "mmlu_math", "--limit", "1", "--out", str(tmp_path / "out"),
                 "--data-dir", str(FIXTURES), "--tokenizer", models["hub"]]) == 2
    assert f"member 'hub'" in (err := capsys.readouterr().err) and CUDA_MISSING in err


def test_bts_eval_on_the_cpu_is_unchanged(tmp_path, models, capsys):
    """--device cpu --dtype float32 (the old spelling, still accepted) and the defaults score the same."""
    scores = []
    for extra in ([], ["--device", "cpu", "--dtype", "float32"]):
        out = tmp_path / f"out{len(scores)}"
        assert main(["eval", models["lm"], "--tasks", "mmlu_math", "--limit", "2", "--out", str(out),
                     "--data-dir", str(FIXTURES), "--names", "lm", *extra]) == 0
        scores.append((out / "downstream.json").read_text())
    assert scores[0] == scores[1]


def test_lm_eval_device_choice(monkeypatch):
    argv = ["--model", "hf", "--model_args", "pretrained=x", "--tasks", "bts_mmlu_math"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lmeval.device_argv(argv) == [*argv[:2], "--tasks", "bts_mmlu_math", "--device", "cpu",
                                        "--model_args", "pretrained=x,dtype=float32"]
    fake_gpus(monkeypatch)
    chosen = lmeval.device_argv(argv)
    assert chosen[chosen.index("--device") + 1] == "cuda:0"  # lm-eval is told the GPU, not left to guess
    assert chosen[chosen.index("--model_args") + 1] == "pretrained=x,dtype=bfloat16"
    mine = lmeval.device_argv([*argv[:2], "--model_args", "pretrained=x,dtype=float16", "--device", "cpu",
                               "--members-dtype", "float32"])
    assert mine == ["--model", "hf", "--model_args", "pretrained=x,dtype=float16", "--device", "cpu"]  # theirs wins
    assert lmeval.device_argv(["-h"]) == ["-h"]


def test_every_computing_command_has_the_shared_options():
    from bts.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in ("run", "demo", "eval", "gates", "merge", "btx", "build", "add-expert", "remove-expert"):
        options = {o for a in sub.choices[name]._actions for o in a.option_strings}
        assert "--device" in options, name
        if name not in ("merge", "btx"):  # those write in the seed's own dtype
            assert "--members-dtype" in options, name
    assert Path(lmeval.__file__).exists()
