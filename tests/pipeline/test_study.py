"""Studies (bts.pipeline.study, recipes/paper.yaml): the smoke recipe over two seeds with tiny steps, a variant, a
refused variant and a curve point; members shared bit for bit, seeds that change the stitch, the aggregation's
arithmetic, reruns that train nothing, and bad study files refused before anything is written."""

import hashlib
import json
import math

import pytest
import yaml

from bts import BTSError
from bts.cli import main
from bts.core.members import weights_sha256
from bts.pipeline.study import load_study, run_study
from bts.report.study import aggregate_methods, ranked, stats, tie

TINY = ["seed_model.train.steps=6", "experts.train.steps=3", "stitch.train.steps=4", "stitch.train.warmup=1",
        "baselines.methods=[soup,btx_soft]", "baselines.sweep=false", "downstream.tasks=[mmlu_math]",
        "downstream.limit=2", "data.eval_tokens=512"]


def _study_file(tmp_path, **changes):
    study = {"name": "tiny", "base": "smoke", "seeds": [0, 1],
             "variants": {"all_e2h": {"stitch.all_e2h": True}, "bad": {"stitch.init": "nope"}}, "curve": [2]}
    study.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    root = tmp / "run"
    study = load_study(str(_study_file(tmp)), TINY)
    out = run_study(study, root)
    return study, root, out


def _markers(root):
    """Every stage marker but the report's (the report is drawn again on every run, by design)."""
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("stages/*.json") if p.name != "report.json"}


def test_seed_runs_share_bit_identical_members(study_run):
    _, root, _ = study_run
    s0, s1 = root / "seed-0", root / "seed-1"
    for d in ("code", "prose", "math", "legal"):
        marker = json.loads((s1 / "stages" / f"expert-{d}.json").read_text())
        assert marker["trained"] is False and "tokens" not in marker
        assert marker["sha256"] == weights_sha256(s0 / "models" / f"expert-{d}")
        assert marker["path"] == str((s0 / "models" / f"expert-{d}").resolve())
    assert not (s1 / "models" / "seed").exists() and not list((s1 / "models").glob("expert-*"))
    assert not list((s1 / "train").glob("expert-*")) and not (s1 / "train" / "seed").exists()
    r0, r1 = (json.loads((d / "results.json").read_text()) for d in (s0, s1))
    # same members and the same held-out text (data.split_seed): the members score exactly the same
    for m in ("seed", "expert:code", "expert:legal"):
        assert r0["methods"][m]["heldout_loss"] == r1["methods"][m]["heldout_loss"]
    # the seed changes the stitch: its weights and its losses
    assert r0["methods"]["bts"]["avg_heldout_loss"] != r1["methods"]["bts"]["avg_heldout_loss"]
    h0, h1 = (hashlib.sha256(b"".join(p.read_bytes() for p in sorted((d / "models" / "bts").glob("*.safetensors"))))
              .hexdigest() for d in (s0, s1))
    assert h0 != h1
    # seed-1 trains only the trained baselines: the merge is seed-0's alone
    assert "btx_soft" in r1["methods"] and "soup" not in r1["methods"] and "soup" in r0["methods"]
    assert "downstream" in r1


def test_study_json_aggregates_seeds_variants_and_curve(study_run):
    _, root, out = study_run
    saved = json.loads((root / "study.json").read_text())
    assert saved == json.loads(json.dumps(out))  # what run_study returned is what it wrote
    assert saved["methods"]["bts"]["avg"]["n"] == 2 and saved["methods"]["soup"]["avg"]["n"] == 1
    vals = [json.loads((root / f"seed-{s}" / "results.json").read_text())["methods"]["bts"]["avg_heldout_loss"]
            for s in (0, 1)]
    assert saved["methods"]["bts"]["avg"]["mean"] == pytest.approx(sum(vals) / 2, rel=1e-12)
    assert saved["methods"]["bts"]["avg"]["spread"] == pytest.approx(abs(vals[0] - vals[1]) / 2, rel=1e-12)
    assert saved["variants"]["all_e2h"]["avg"]["n"] == 2
    assert "stitch.init" in saved["variants"]["bad"]["error"] and not (root / "variant-bad").exists()
    assert [p["steps"] for p in saved["curve"]] == [4, 8] and saved["curve"][1]["avg"]["n"] == 2
    assert saved["curve"][1]["tokens"] == 2 * saved["curve"][0]["tokens"]
    assert yaml.safe_load((root / "steps-8" / "seed-1" / "recipe.yaml").read_text())["stitch"]["train"]["steps"] == 8
    report = (root / "report" / "report.md").read_text()
    assert "not run: " in report and "ties with" in report and (root / "report" / "curve.png").exists()


def test_rerun_skips_finished_subruns(study_run):
    _, root, _ = study_run
    before = _markers(root)
    assert len(before) > 30
    again = load_study(str(root.parent / "study.yaml"), TINY)
    run_study(again, root)
    assert _markers(root) == before


def test_aggregation_arithmetic_on_hand_made_numbers():
    a = stats([1.0, 2.0, 4.0])
    assert a["mean"] == pytest.approx(7 / 3, rel=1e-15) and a["spread"] == 1.5 and a["n"] == 3
    b = stats([3.5, 3.7])  # mean 3.6, spread 0.1: |Δ| = 1.2667 ≤ 1.5 → a tie
    c = stats([10.0, 10.2])  # |Δ| from a = 7.77 > 1.5 → not a tie
    assert tie(a, b) and tie(b, a) and not tie(a, c)
    d = stats([3.55, 3.95])  # mean 3.75, spread 0.2; vs b: |Δ| = 0.15 ≤ max(0.1, 0.2)
    e = stats([3.9, 3.9])  # spread 0: vs b |Δ| = 0.3 > 0.1
    assert tie(b, d) and not tie(b, e)
    assert stats([5.0])["spread"] == 0 and stats([None, math.nan])["n"] == 0
    rows = ranked({"a": a, "b": b, "c": c})
    assert [r[1] for r in rows] == ["a", "b", "c"] and rows[0][3] == ["b"] and rows[2][3] == []
    assert [r[1] for r in ranked({"b": b, "c": c}, higher_is_better=True)] == ["c", "b"]
    runs = [{"methods": {"x": {"avg_heldout_loss": 2.0, "heldout_loss": {"p": 1.0, "q": 3.0},
                               "mixed_docs_loss": {"m": 5.0}}}},
            {"methods": {"x": {"avg_heldout_loss": 3.0, "heldout_loss": {"p": 2.0, "q": 4.0},
                               "mixed_docs_loss": {"m": 6.0}}, "y": {"avg_heldout_loss": 9.0, "heldout_loss": {}}}}]
    agg = aggregate_methods(runs)
    assert agg["x"]["avg"]["mean"] == 2.5 and agg["x"]["domains"]["q"]["spread"] == 0.5
    assert agg["x"]["mixed"]["m"]["mean"] == 5.5 and agg["y"]["avg"]["n"] == 1


@pytest.mark.parametrize("changes, fragment", [
    ({"seedz": [0, 1]}, "unknown study key 'seedz' in"),
    ({"seeds": [0, 0]}, "study key 'seeds' must be a list of distinct integers"),
    ({"curve": [0]}, "study key 'curve' must be a list of positive multiples"),
    ({"variants": {"v": "stitch.output=mix_hidden"}}, "study key 'variants' must map each name"),
    ({"base": "nosuch"}, "recipe 'nosuch' is neither a YAML file nor a built-in recipe"),
])
def test_bad_study_is_one_sentence_and_writes_nothing(tmp_path, capsys, changes, fragment):
    path = _study_file(tmp_path, **changes)
    with pytest.raises(BTSError, match=fragment.replace("(", r"\(")):
        load_study(str(path))
    out = tmp_path / "out"
    assert main(["run", str(path), "--run-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and not out.exists()


def test_bad_base_override_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(_study_file(tmp_path)), "stitch.train.steps=-1", "--run-dir", str(out)]) == 2
    assert "stitch.train.steps must be positive" in capsys.readouterr().err and not out.exists()


def test_bundled_paper_study_plans_every_seed_and_variant():
    study = load_study("paper")
    names = [s.name for s in study.subruns]
    assert names[:3] == ["seed-0", "seed-1", "seed-2"]
    assert {n.split("/")[0] for n in names if n.startswith("variant-")} == {
        f"variant-{v}" for v in ("mix_hidden", "mix_logprobs", "lstsq_init", "two_stitches", "all_e2h",
                                 "lr_seed_final")}
    steps = study.base_recipe.stitch.train.steps
    assert study.steps_points == [round(0.5 * steps), 2 * steps, 4 * steps]
