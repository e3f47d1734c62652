"""The paper-regime sections of the report (bts.report.regime), from hand-made run-directory files: every number
in a table is one put into results.json, a stage marker, a given seed's card or eval/gates.json."""

from __future__ import annotations

import json

import yaml

from bts.report import write_report
from bts.report.regime import budget_regime, mixed_gates, specialisation

# A given seed's card: 1 M tokens; lr 4e-3 cosine to 1 % (4e-5). An expert: 10 k tokens (1 % of the seed's), lr
# 5e-5 (1.25× the seed's final); the stitch and BAM: 750 tokens (0.075 % of the seed's, 7.5 % of an expert's).
CARD = {"tokens": 1_000_000, "steps": 100, "batch_size": 80, "seq_len": 125, "lr": 4e-3, "min_lr_ratio": 0.01,
        "recipe": "seed", "curve": [{"step": s, "tokens": 10_000 * s, "val_avg": 6.0 - s / 100,
                                     "val_loss": {"a": 6.0 - s / 50, "b": 6.0}} for s in (10, 50, 100)]}
SETS = ("code_doc", "math_prose")


def _entry(a, b, docs):
    return {"heldout_loss": {"a": a, "b": b}, "avg_heldout_loss": (a + b) / 2, "mixed_heldout_loss": a,
            "trainable_params": 10, "total_params": 100, "active_params": 100,
            "mixed_docs_loss": dict(zip(SETS, docs))}


def _run_dir(root, seed_marker):
    methods = {"seed": _entry(3.0, 4.0, (5.0, 5.5)), "expert:a": _entry(2.5, 4.25, (4.75, 5.75)),
               "expert:b": _entry(3.5, 4.5, (5.25, 5.5)),  # worse than the seed on its own domain
               "bts": _entry(2.75, 4.0, (4.875, 5.5)), "bam": _entry(2.625, 4.0, (5.0, 5.5)),
               "bam_adapters": _entry(2.875, 4.0, (5.0, 5.5)), "soup": _entry(2.9, 4.1, (5.0, 5.5))}
    results = {"schema": "bts.results/1", "recipe": "t", "domains": ["a", "b"], "expert_domains": ["a", "b"],
               "seq_len": 125, "mixed_docs": {s: {"documents": 2, "tokens_scored": 250} for s in SETS},
               "methods": methods}
    (root / "results.json").write_text(json.dumps(results))
    (root / "recipe.yaml").write_text(yaml.safe_dump({"name": "t", "seed_model": {"train": {"min_lr_ratio": 0.1}}}))
    late = {"steps": 6, "batch_size": 1, "seq_len": 125, "lr": 5e-5, "data": {"a": 0.5, "b": 0.5}}
    markers = {"seed": seed_marker,
               "expert-a": {"tokens": 10_000, "budget": {**late, "steps": 80, "data": "a"}},
               "expert-b": {"tokens": 10_000, "budget": {**late, "steps": 80, "data": "b"}},
               "stitch": {"tokens": 750, "budget": late}, "baseline-bam": {"tokens": 750, "budget": late},
               "baseline-bam_adapters": {"tokens": 750, "budget": {**late, "lr": 1e-4}}, "baseline-soup": {}}
    (root / "stages").mkdir()
    for name, info in markers.items():
        (root / "stages" / f"{name}.json").write_text(json.dumps({"stage": name, "wall_s": 1.0, **info}))
    (root / "eval").mkdir()
    weights = {"code_doc": {"hub": 0.7, "a": 0.1, "b": 0.2}, "math_prose": {"hub": 0.5, "a": 0.375, "b": 0.125}}
    per_set = {s: {"after block 1": {"hub": 1.0, "a": 0.0, "b": 0.0}, "after block 3": w} for s, w in weights.items()}
    heat = {"members": ["hub", "a", "b"], "stitch": 1, "after_block": 3, "bounds": [[0, "a"]],
            "mass": [[0.5] * 4, [0.25] * 4, [0.25] * 4]}
    (root / "eval" / "gates.json").write_text(json.dumps({
        "schema": "bts.gates/1", "per_domain": {d: {"after block 3": {"hub": 0.6, "a": 0.2, "b": 0.2}} for d in "ab"},
        "heatmap": heat, "mixed_docs_gates": per_set}))
    return root


GIVEN = {"trained": False, "given": "/seeds/demo", "path": "/seeds/demo", "sha256": "0" * 64, "card": CARD}


def _rows(md: str, title: str) -> dict[str, list[str]]:
    body = md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines() if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:]}


def test_budgets_of_a_given_seed_come_from_its_card_next_to_the_papers(tmp_path):
    md = write_report(_run_dir(tmp_path, GIVEN)).read_text()
    rows = _rows(md, "Budgets against the paper's")
    assert rows["seed (given: its card)"] == ["1.00M", "100 × 80 × 125", "0.004 → 4e-05 (cosine)", "1×", "100×",
                                              "15 T", "1×, 75×", "0.0004 → 4e-06 (cosine)"]
    assert rows["expert:a"] == ["10.00k", "80 × 1 × 125", "5e-05 (1.25×)", "1 %", "1×", "200 B", "1.3 %, 1×",
                                "5e-06 (1.25×)"]
    paper_stitch = ["15 B", "0.1 %, 7.5 %", "5e-06 (1.25×)"]
    assert rows["bts"] == ["750", "6 × 1 × 125", "5e-05 (1.25×)", "0.075 %", "7.5 %", *paper_stitch]
    assert rows["bam"] == rows["bts"] and rows["bam_adapters"][2] == "0.0001 (2.5×)"
    assert rows["bam_adapters"][-3:] == paper_stitch
    assert "soup" not in rows  # untrained: no budget
    assert "not trained in this run: its figures are its card's (seed.json)" in md
    assert (tmp_path / "report" / "seed_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "![The seed's validation curve](seed_curve.png)" in md


def test_a_seed_trained_in_the_run_uses_its_marker_and_the_recipes_final_lr(tmp_path):
    trained = {"trained": True, "tokens": 2_000_000,
               "budget": {"data": {"a": 0.5, "b": 0.5}, "steps": 200, "batch_size": 80, "seq_len": 125, "lr": 1e-3}}
    root = _run_dir(tmp_path, trained)
    (root / "train" / "seed").mkdir(parents=True)
    (root / "train" / "seed" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 1, "loss": 7.0}, {"step": 2, "loss": 6.0, "tokens": 20, "val_avg": 6.5, "val_loss": {"a": 6.5}})))
    results = json.loads((root / "results.json").read_text())
    stages = {p.stem: json.loads(p.read_text()) for p in (root / "stages").glob("*.json")}
    _, rows = budget_regime(results, stages, yaml.safe_load((root / "recipe.yaml").read_text()))
    rows = {r[0]: r[1:] for r in rows}
    assert rows["seed"][:5] == ["2.00M", "200 × 80 × 125", "0.001 → 0.0001 (cosine)", "1×", "200×"]
    assert rows["expert:a"][2:4] == ["5e-05 (0.5×)", "0.5 %"]
    md = write_report(root).read_text()
    assert "The seed was trained in this run" in md and (root / "report" / "seed_curve.png").exists()


def test_specialisation_forgetting_and_what_bts_keeps(tmp_path):
    md = write_report(_run_dir(tmp_path, GIVEN)).read_text()
    rows = _rows(md, "Specialisation and forgetting")
    # expert:a: a 2.5 vs 3.0, b 4.25 vs 4.0, code_doc 4.75 vs 5.0, math_prose 5.75 vs 5.5; bts gains 0.25 of 0.5
    assert rows["expert:a"] == ["a", "-0.500", "+0.250", "-0.250", "+0.250", "50%"]
    assert rows["expert:b"] == ["b", "+0.500", "+0.500", "+0.250", "+0.000", "–"]  # no gain over the seed: –
    header, _ = specialisation(json.loads((tmp_path / "results.json").read_text()))
    assert header[4:6] == ["Δ code_doc", "Δ math_prose"]


def test_mean_gates_per_mixed_document_set_at_the_last_stitch(tmp_path):
    md = write_report(_run_dir(tmp_path, GIVEN)).read_text()
    rows = _rows(md, "Who feeds the hub on the natural mixed-document sets")
    assert rows == {"code_doc (after block 3)": ["0.700", "0.100", "**0.200**"],
                    "math_prose (after block 3)": ["0.500", "**0.375**", "0.125"]}
    assert "<th>mixed-document set (last E→H stitch)</th>" in (tmp_path / "report" / "report.html").read_text()
    assert mixed_gates({"per_domain": {}}) is None  # gates.json from before the sets: no table


def test_a_run_without_seed_budget_nor_mixed_sets_has_no_regime_sections(tmp_path):
    root = _run_dir(tmp_path, {"trained": False, "given": "/x", "path": "/x", "sha256": "0" * 64})
    gates = json.loads((root / "eval" / "gates.json").read_text())
    del gates["mixed_docs_gates"]
    (root / "eval" / "gates.json").write_text(json.dumps(gates))
    md = write_report(root).read_text()
    rows = _rows(md, "Budgets against the paper's")
    assert rows["expert:a"][2:5] == ["5e-05", "–", "1×"]  # no seed figures: no shares of it
    assert "seed_curve" not in md and "natural mixed-document sets (mean" not in md
