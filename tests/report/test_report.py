"""The report is drawn from files only: results.json, stage markers (with their training budgets), eval/gates.json,
recipe.yaml (plain YAML); writing it imports no pipeline and loads no model."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from bts.report import write_report

STAGE_ORDER = ["data", "seed", "expert-a", "stitch", "baseline-btx_top2", "baseline-soup", "evaluate", "report"]


def _run_dir(root):
    def entry(loss):
        return {"heldout_loss": {"a": loss, "b": loss + 1}, "avg_heldout_loss": loss + 0.5, "mixed_heldout_loss": loss,
                "trainable_params": 10, "total_params": 2000, "active_params": 2000,
                "mixed_docs_loss": {"code_doc": loss + 0.125, "math_prose": 6.0 - loss}}

    results = {"schema": "bts.results/1", "recipe": "t", "domains": ["a", "b"], "expert_domains": ["a"],
               "seq_len": 8, "mixed_docs": {s: {"source": "PyPI package p (x)", "version": "1", "license": "MIT",
                                                "documents": 3, "tokens_scored": 64} for s in ("code_doc", "math_prose")},
               "methods": {"seed": entry(3.0), "expert:a": entry(2.5), "bts": entry(2.25),
                                         "btx_top2": entry(2.75), "soup": entry(2.8)}}
    (root / "results.json").write_text(json.dumps(results))
    (root / "recipe.yaml").write_text(yaml.safe_dump({"name": "t", "modularity": {"enabled": False}}))
    mix = {"a": 0.75, "b": 0.25}
    markers = {
        "seed": {"tokens": 4096, "final_loss": 3.1, "budget": {"data": "all domains equally", "steps": 60,
                                                                "batch_size": 8, "seq_len": 8, "lr": 0.003}},
        "expert-a": {"tokens": 1024, "budget": {"data": "a", "steps": 20, "batch_size": 8, "seq_len": 8, "lr": 0.002}},
        "stitch": {"tokens": 1024, "mix": mix, "budget": {"data": mix, "steps": 20, "batch_size": 8, "seq_len": 8,
                                                          "lr": 0.002}},
        "baseline-btx_top2": {"tokens": 1024, "budget": {"data": mix, "steps": 20, "batch_size": 8, "seq_len": 8,
                                                         "lr": 0.0005}},
        "baseline-soup": {}, "evaluate": {}, "data": {},
    }
    (root / "stages").mkdir()
    for name, info in markers.items():
        (root / "stages" / f"{name}.json").write_text(json.dumps({"stage": name, "wall_s": 1.0, **info}))
    (root / "eval").mkdir()
    per_domain = {d: {"after block 1": {"hub": 0.6, "a": 0.3, "b": 0.1}} for d in ("a", "b")}
    heat = {"members": ["hub", "a"], "stitch": 1, "after_block": 1, "bounds": [[0, "a"], [4, "b"]],
            "mass": [[0.75] * 8, [0.25] * 8]}
    doc_heat = {**heat, "bounds": [[0, "license"], [3, "docstring"], [6, "code"]], "document": "m.py tokens 0–8"}
    (root / "eval" / "gates.json").write_text(json.dumps({"schema": "bts.gates/1", "per_domain": per_domain,
                                                          "heatmap": heat, "mixed_docs_heatmap": doc_heat}))
    return root


def test_report_reads_budgets_gates_and_stage_order_from_files(tmp_path):
    root = _run_dir(tmp_path)
    md = write_report(root, stage_order=STAGE_ORDER).read_text()
    assert "| seed | all domains equally | 60 | 8 × 8 | 0.003 | 4.10k |" in md
    assert "| expert:a | a | 20 | 8 × 8 | 0.002 | 1.02k |" in md
    assert "| bts | a 75%, b 25% | 20 | 8 × 8 | 0.002 | 1.02k |" in md
    assert "| btx_top2 | a 75%, b 25% | 20 | 8 × 8 | 0.0005 | 1.02k |" in md
    assert "| soup | a 75%" not in md  # not trained: no budget row
    assert "Who feeds the hub, per domain" in md and "| a (after block 1) | 0.600 | **0.300** | 0.100 |" in md
    stages = md.split("## Stages")[1]
    listed = [line.split("|")[1].strip() for line in stages.splitlines() if line.startswith("| ") and "stage" not in line]
    assert listed == [s for s in STAGE_ORDER if (root / "stages" / f"{s}.json").exists()]
    for png in ("gates.png", "heldout_loss.png"):
        assert (root / "report" / png).read_bytes()[:4] == b"\x89PNG"
    assert "<h2>Training budget" in (root / "report" / "report.html").read_text()


def test_report_shows_each_mixed_document_set_as_a_column_and_its_gates(tmp_path):
    root = _run_dir(tmp_path)
    md = write_report(root, stage_order=STAGE_ORDER).read_text()
    assert "| method | a | b | avg | mixed | code_doc | math_prose |" in md
    # per column the lowest loss is bold: code_doc is lowest for bts (2.375), math_prose for seed (3.000)
    assert "| bts | **2.250** | **3.250** | **2.750** | **2.250** | **2.375** | 3.750 |" in md
    assert "| seed | 3.000 | 4.000 | 3.500 | 3.000 | 3.125 | **3.000** |" in md
    assert "`code_doc` (PyPI package p 1, MIT; 3 documents, 64 tokens scored)" in md
    assert "![Gates on a natural mixed document](gates_mixed_docs.png)" in md
    assert (root / "report" / "gates_mixed_docs.png").read_bytes()[:4] == b"\x89PNG"
    assert "<th>code_doc</th>" in (root / "report" / "report.html").read_text()


def test_a_results_file_without_mixed_document_sets_keeps_the_old_columns(tmp_path):
    root = _run_dir(tmp_path)
    results = json.loads((root / "results.json").read_text())
    del results["mixed_docs"]
    (root / "results.json").write_text(json.dumps(results))
    gates = json.loads((root / "eval" / "gates.json").read_text())
    del gates["mixed_docs_heatmap"]
    (root / "eval" / "gates.json").write_text(json.dumps(gates))
    md = write_report(root).read_text()
    assert "| method | a | b | avg | mixed |\n" in md and "gates_mixed_docs" not in md


def test_writing_a_report_imports_no_pipeline_and_loads_no_model(tmp_path):
    root = _run_dir(tmp_path)
    code = ("import sys, bts.report\n"
            f"bts.report.write_report({str(root)!r})\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('bts.pipeline', 'bts.baselines', 'bts.train')))\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (root / "report" / "report.md").exists()
