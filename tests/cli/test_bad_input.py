"""Every kind of bad input, through the command line: exit 2, one line `bts: error: <one sentence naming the field
and the offending value>.`, no traceback, and nothing that existed before is changed or marked complete.

Each row builds its bad input in a fresh folder and names the fragments its message must contain. Commands run in a
forked child (bts.cli.child.run_cli: the real CLI entry point, without paying the interpreter start per row); one
row runs through `python -m bts` to check the process boundary too.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, save_members, tiny_model

from bts import BTSError
from bts.cli.child import run_cli


def _files_domain(tmp: Path, name: str, content: bytes | str) -> list[str]:
    """`bts run` over the tiny recipe with a second domain read from one user file."""
    f = tmp / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    domains = f"{{code: {{source: fixture}}, mine: {{source: files, files: ['{f}']}}}}"
    return ["run", "smoke", *TINY, f"data.domains={domains}", "--run-dir", str(tmp / "run")]


def _recipe(*overrides):
    return lambda tmp: (["run", "smoke", *TINY, *overrides, "--run-dir", str(tmp / "run")])


def _recipe_file(text):
    def make(tmp):
        (tmp / "r.yaml").write_text(text)
        return ["run", str(tmp / "r.yaml"), "--run-dir", str(tmp / "run")]
    return make


def _members(tmp: Path, n: int = 1):
    return save_members(tmp / "m", "llama", n)


def _build(tmp: Path, hub, experts, *extra):
    return ["build", "--hub", str(hub), "--experts", *map(str, experts), "--out", str(tmp / "out"), *extra]


def _truncated_member(tmp):
    hub, experts = _members(tmp)
    weights = Path(experts[0]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return _build(tmp, hub, experts)


def _garbage_member(tmp):
    hub, experts = _members(tmp)
    (Path(experts[0]) / "model.safetensors").write_bytes(b"\x00" * 64)
    return _build(tmp, hub, experts)


def _changed_member(tmp):
    """A stitched model is saved, then one of its members is retrained in place: loading it must refuse."""
    from bts import BTSForCausalLM

    hub, experts = _members(tmp)
    BTSForCausalLM.from_members(hub, experts, num_stitches=2).save_pretrained(tmp / "stitched")
    other = tiny_model("llama", seed=7)
    other.save_pretrained(experts[0])
    return ["eval", str(tmp / "stitched"), "--tasks", "mmlu_math", "--limit", "1", "--out", str(tmp / "out"),
            "--tokenizer", str(tmp / "tok"), "--data-dir", str(tmp / "tasks")]


def _pickled_member(tmp):
    hub, _ = _members(tmp)
    pickled = tmp / "pickled"
    tiny_model("llama").config.save_pretrained(pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    return _build(tmp, hub, [pickled])


def _wider_member(tmp):
    hub, _ = _members(tmp)
    tiny_model("llama", hidden_size=48).save_pretrained(tmp / "wide")
    return _build(tmp, hub, [tmp / "wide"])


def _eval_context(max_length, max_new_tokens):
    def make(tmp):
        hub, _ = _members(tmp)
        return ["eval", hub, "--tasks", "gsm8k", "--limit", "1", "--out", str(tmp / "out"),
                "--max-length", str(max_length), "--max-new-tokens", str(max_new_tokens),
                "--data-dir", str(tmp / "tasks")]
    return make


# bts.core.members.load_causal_lm words a corrupt member as "could not be loaded: <safetensors' message>": it names the
# member but not the file and does not end as a sentence (members.py is outside this test's owner's reach).

CASES = [
    # recipes: keys, types and values
    ("unknown key", _recipe("stitch.train.stpes=3"), ["stitch.train.stpes", "did you mean 'steps'"]),
    ("unknown section", _recipe("stich.num_stitches=2"), ["'stich'", "did you mean 'stitch'"]),
    ("wrong type", _recipe("experts.train.steps=abc"), ["experts.train.steps", "'abc'"]),
    ("negative steps", _recipe("seed_model.train.steps=-5"), ["seed_model.train.steps", "-5"]),
    ("lr zero", _recipe("stitch.train.lr=0"), ["stitch.train.lr", "0"]),
    ("lr negative", _recipe("experts.train.lr=-0.1"), ["experts.train.lr", "-0.1"]),
    ("lr nan", _recipe("experts.train.lr=.nan"), ["experts.train.lr", "nan"]),
    ("lr inf", _recipe("experts.train.lr=.inf"), ["experts.train.lr", "inf"]),
    ("datamix weight zero", _recipe("stitch.domain_weights={code: 0}"), ["stitch.domain_weights.code", "0"]),
    ("general weight 1", _recipe("stitch.general_weight=1.0"), ["stitch.general_weight", "1.0"]),
    ("positions out of range", _recipe("stitch.positions=[0, 9]"), ["stitch.positions", "[0, 9]", "1..2"]),
    ("positions unordered", _recipe("stitch.positions=[2, 1]"), ["stitch.positions", "[2, 1]"]),
    ("more stitches than layers", _recipe("stitch.num_stitches=3"), ["stitch.num_stitches", "3", "num_layers=2"]),
    ("domain escaping the run dir", _recipe("data.domains={../../x: {source: fixture}}"), ["'../../x'"]),
    ("recipe name escaping runs/", _recipe("name=../../etc"), ["name", "'../../etc'"]),
    ("expert of no domain", _recipe("experts.domains=[physics]"), ["experts.domains", "'physics'"]),
    ("unknown baseline", _recipe("baselines.methods=[btx_top3]"), ["baselines.methods", "'btx_top3'"]),
    ("unknown stage", lambda tmp: ["run", "smoke", *TINY, "--stages", "bogus", "--run-dir", str(tmp / "run")],
     ["bogus"]),
    ("unknown recipe", lambda tmp: ["run", "no-such-recipe", "--run-dir", str(tmp / "run")], ["'no-such-recipe'"]),
    ("invalid YAML", _recipe_file("data: [unclosed\n"), ["r.yaml", "not valid YAML"]),
    ("python tag in a recipe", _recipe_file("name: !!python/object/apply:os.system ['echo pwned']\n"),
     ["r.yaml", "python/object/apply:os.system"]),
    # data
    ("empty dataset", lambda tmp: _files_domain(tmp, "empty.txt", ""), ["empty.txt"]),
    ("fewer tokens than one sequence", lambda tmp: _files_domain(
        tmp, "tiny.jsonl", "".join(json.dumps({"text": f"w{i}"}) + "\n" for i in range(12))), ["'mine'", "seq_len=64"]),
    ("text field that does not exist", lambda tmp: _files_domain(
        tmp, "rows.jsonl", json.dumps({"body": "x"}) + "\n"), ["text_field", "'text'", "rows.jsonl"]),
    ("files matching nothing", lambda tmp: ["run", "smoke", *TINY,
                                            f"data.domains={{code: {{source: files, files: ['{tmp}/none/*.txt']}}}}",
                                            "--run-dir", str(tmp / "run")], ["none/*.txt"]),
    # models
    ("truncated member safetensors", _truncated_member, ["e0", "deserializing"]),
    ("garbage member safetensors", _garbage_member, ["e0", "deserializing"]),
    ("pickle-only member", _pickled_member, ["pickled", ".safetensors"]),
    ("missing member dir", lambda tmp: _build(tmp, tmp / "nowhere", [tmp / "nowhere2"]), ["hub", "nowhere"]),
    ("member of another width", _wider_member, ["hidden_size=48", "hidden_size=32"]),
    ("stitched model whose member changed", _changed_member, ["'e0'", "changed"]),
    # evaluation
    ("context too short for generation", _eval_context(64, 64), ["max-new-tokens", "64", "max-length"]),
    ("context longer than the model's", _eval_context(4096, 16), ["max-length", "4096", "128"]),
]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows():
    for name, make, needles, *known_defect in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=known_defect[0])] if known_defect else []
        yield pytest.param(make, needles, id=name, marks=marks)


@pytest.mark.parametrize("make, needles", list(_rows()))
def test_bad_input_is_one_sentence_and_changes_nothing(tmp_path, make, needles):
    argv = make(tmp_path)
    before = _snapshot(tmp_path)
    rc = run_cli(argv, tmp_path / "log")
    log = (tmp_path / "log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("bts: error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in log, log
    message = errors[0]
    assert log.strip().endswith(message) and message.rstrip().endswith("."), log
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    # Nothing that was there before changed; nothing new claims completion.
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before and k != "log"} == {k: v for k, v in before.items()
                                                                            if k != "log"}
    new = set(after) - set(before) - {"log"}
    finished = {"run/stages/data.json", "run/stages/tokenizer.json"}  # stages before the failing one may finish
    assert not [f for f in new - finished if f.startswith(("out/", "run/stages/", "run/results.json", "run/eval/"))]
    assert "pwned" not in log


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    rc = run_cli(["run", "smoke", *TINY, "seed_model.train.lr=1e30", "seed_model.train.warmup=0",
                  "seed_model.train.ckpt_every=1", "--run-dir", str(run)], tmp_path / "log")
    log = (tmp_path / "log").read_text()
    assert rc == 2 and "Traceback" not in log, log
    error = log.strip().splitlines()[-1]
    assert error.startswith("bts: error: seed: the loss became") and "at step 1" in error
    ckpts = sorted(p.name for p in (run / "train/seed/ckpt").glob("step-*"))
    assert ckpts == ["step-0000001"]  # the step before the non-finite loss
    assert not (run / "stages/seed.json").exists() and not (run / "models/seed").exists()


def test_btm_top_k_larger_than_the_members(tmp_path):
    """k > n where a top-k option exists (API only: no command takes it)."""
    from bts.baselines.btm import BTMEnsemble

    hub, experts = _members(tmp_path)
    with pytest.raises(BTSError, match=r"top_k .* 2 members \(got 3\)"):
        BTMEnsemble.from_members([hub, *experts], top_k=3)


def test_bad_input_through_a_real_interpreter(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bts", "run", "smoke", "data.domains={../x: {source: fixture}}",
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "'../x'" in proc.stderr
    assert not (tmp_path / "run").exists()


# ---- security: what is loaded is never executed -------------------------------------------------------------
SRC = Path(__file__).resolve().parents[2] / "src" / "bts"


def test_every_torch_load_is_weights_only_and_nothing_trusts_remote_code():
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("#")[0]
            if "torch.load(" in code:
                assert "weights_only=True" in code, f"{f}:{i}: {line.strip()}"
            assert "trust_remote_code=True" not in code, f"{f}:{i}"
            assert not re.search(r"pickle\.loads?\(|(?<![\w.])(eval|exec)\(", code), f"{f}:{i}: {line.strip()}"
        assert "yaml.load(" not in text and "yaml.unsafe_load" not in text, f
