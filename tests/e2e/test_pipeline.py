"""The whole pipeline end to end on the `smoke` preset (committed fixture text, tiny models), and its CLI."""

import json
import subprocess
import sys

import pytest

from bts import BTSError
from bts.pipeline.run import Run
from bts.pipeline.recipe import load_recipe

SCHEMA_FIELDS = ("heldout_loss", "avg_heldout_loss", "trainable_params", "total_params", "active_params")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    run = Run(load_recipe("smoke"), root)
    results = run.all()
    return run, results


def test_results_follow_the_schema(smoke_run):
    run, results = smoke_run
    assert results["schema"] == "bts.results/1"
    assert results["domains"] == ["code", "prose", "math", "legal"]
    expected = {"seed", "bts", *(f"expert:{d}" for d in results["domains"]), *run.recipe.baselines.methods}
    assert set(results["methods"]) == expected
    for name, entry in results["methods"].items():
        for field in SCHEMA_FIELDS:
            assert field in entry, (name, field)
        assert set(entry["heldout_loss"]) == set(results["domains"])
        assert entry["avg_heldout_loss"] == pytest.approx(sum(entry["heldout_loss"].values()) / 4)
    bts, seed = results["methods"]["bts"], results["methods"]["seed"]
    # Only the stitches train; the stitched model holds the seed and four experts' decoders (their LM heads are
    # never used, so they are not loaded): seed + 4 × (seed − head) + stitches.
    cfg = json.loads(run.path("models", "seed", "config.json").read_text())
    head = cfg["vocab_size"] * cfg["hidden_size"]  # untied in the smoke seed
    assert bts["total_params"] == seed["total_params"] + 4 * (seed["total_params"] - head) + bts["trainable_params"]
    assert bts["trainable_params"] < bts["total_params"] / 5


def test_experts_specialise_on_their_domain(smoke_run):
    """Experts beat the seed on their own held-out domain: on average, and for most domains. (At smoke scale the
    fixture's held-out math chapter shares little notation with its training chapters, so one domain may not;
    the demo recipe, on full corpora, shows every expert clearly ahead — see the README.)"""
    _, results = smoke_run
    seed = results["methods"]["seed"]["heldout_loss"]
    gains = {d: seed[d] - results["methods"][f"expert:{d}"]["heldout_loss"][d] for d in results["domains"]}
    assert sum(gains.values()) / len(gains) > 0.05, gains
    assert sum(g > 0 for g in gains.values()) >= 3, gains


def test_heldout_is_split_by_group_and_never_trained_on(smoke_run):
    run, _ = smoke_run
    for d in run.domains:
        groups = {}
        for split in ("train", "val", "heldout"):
            lines = (run.path("data", d, f"{split}.jsonl")).read_text().splitlines()
            groups[split] = {json.loads(x)["group"] for x in lines if x.strip()}
        assert groups["heldout"] and groups["train"]
        assert not groups["heldout"] & groups["train"] and not groups["val"] & groups["train"]


def test_report_and_run_directory(smoke_run):
    run, _ = smoke_run
    for f in ("report/report.md", "report/report.html", "report/training_loss.png", "report/heldout_loss.png",
              "report/gates.png", "recipe.yaml", "env.json", "models/bts/stitch.safetensors"):
        assert run.path(f).is_file(), f
    md = run.path("report/report.md").read_text()
    assert "| bts |" in md and "license" in md.lower() and "Who feeds the hub, per domain" in md
    assert not run.path("run.lock").exists()
    # the modularity stage is off by default: nothing measured, no section
    assert not run.path("modularity").exists() and not run.path("stages/modularity.json").exists()
    assert "Modularity" not in md
    stitch_metrics = [json.loads(x) for x in run.path("train/stitch/metrics.jsonl").read_text().splitlines()]
    assert "gates" in stitch_metrics[-1] and stitch_metrics[-1]["tok_per_s"] > 0
    # The stitched model saved by the pipeline holds no member weights: only stitches and a manifest.
    assert not list(run.path("models/bts").glob("model*.safetensors"))
    # What the report draws comes from files: the evaluate stage's gates, the trained phases' budgets.
    gates = json.loads(run.path("eval/gates.json").read_text())
    assert set(gates["per_domain"]) == set(run.domains) and len(gates["heatmap"]["mass"]) == 5
    assert run.done("stitch")["budget"] == {"data": run.stitch_mix(), "steps": 20, "batch_size": 8, "seq_len": 64,
                                            "lr": 0.002}
    assert run.done("baseline:routing")["budget"]["steps"] == 20 and "budget" not in run.done("baseline:soup")


def test_mixed_document_sets_are_scored_for_every_method_and_disjoint_from_training(smoke_run):
    """The natural mixed-document sets (bts.pipeline.mixed): from the committed fixtures (smoke), scored for
    every method, a column each in the report, one document's gates in eval/gates.json, and no held-out mixed
    document (nor any of its long lines) is in a training or validation split."""
    from bts.data.mixed import MIXED_SETS

    run, results = smoke_run
    assert list(results["mixed_docs"]) == list(MIXED_SETS)
    for name, entry in results["methods"].items():
        losses = entry["mixed_docs_loss"]
        assert set(losses) == set(MIXED_SETS) and all(0 < v < 20 for v in losses.values()), name
    for info in results["mixed_docs"].values():
        assert info["tokens_scored"] == run.recipe.data.eval_tokens and info["documents"] > 0
    trained, lines = set(), set()
    for d in run.domains:
        for split in ("train", "val"):
            for x in run.path("data", d, f"{split}.jsonl").read_text().splitlines():
                text = json.loads(x)["text"]
                trained.add(text)
                lines |= {s.strip() for s in text.splitlines() if len(s.strip()) >= 40}
    for name in MIXED_SETS:
        docs = [json.loads(x)["text"] for x in run.path("data", "mixed", f"{name}.jsonl").read_text().splitlines()]
        assert docs and not set(docs) & trained
        assert not {s.strip() for t in docs for s in t.splitlines() if len(s.strip()) >= 40} & lines
    header = next(line for line in run.path("report/report.md").read_text().splitlines() if line.startswith("| method"))
    assert header.endswith("| mixed | code_doc | prose_code | math_prose |")
    heat = json.loads(run.path("eval/gates.json").read_text())["mixed_docs_heatmap"]
    assert heat["document"].startswith("absl/") and len(heat["mass"]) == 5
    assert len(heat["mass"][0]) == 2 * run.recipe.data.seq_len and heat["bounds"][0][0] == 0
    assert {k for _, k in heat["bounds"]} >= {"docstring", "code"}
    assert run.path("report/gates_mixed_docs.png").read_bytes()[:4] == b"\x89PNG"


def test_report_lists_bam_and_bam_adapters_in_every_table_and_the_paper_regime(smoke_run):
    """The smoke preset trains BAM and BAM with adapters: each table of the report has a row for them; the
    paper-regime sections (bts.report.regime) are there, the mean gates per mixed set summing to 1."""
    from bts.data.mixed import MIXED_SETS

    run, _ = smoke_run
    assert {"bam", "bam_adapters"} <= set(run.recipe.baselines.methods)
    md = run.path("report/report.md").read_text()
    sections = {s.split("\n", 1)[0]: s for s in md.split("\n## ")[1:]}
    for title in ("Held-out loss", "Parameters and training cost", "Downstream tasks", "Training budget",
                  "Budgets against the paper's"):
        body = next(s for t, s in sections.items() if t.startswith(title))
        names = {line.split("|")[1].strip() for line in body.splitlines() if line.startswith("| ")}
        assert {"bam", "bam_adapters"} <= names, title
    gates = json.loads(run.path("eval/gates.json").read_text())["mixed_docs_gates"]
    assert list(gates) == list(MIXED_SETS)
    for layers in gates.values():
        assert sum(list(layers.values())[-1].values()) == pytest.approx(1.0, abs=1e-5)
    assert any(t.startswith("Who feeds the hub on the natural mixed-document sets") for t in sections)
    assert any(t.startswith("Specialisation and forgetting") for t in sections)
    assert run.path("report/seed_curve.png").exists() == bool(run.recipe.seed_model.val_tokens)


def test_rerun_skips_finished_stages(smoke_run):
    run, results = smoke_run
    again = Run(load_recipe("smoke"), run.root).all()
    assert again == results


def test_second_process_refuses_a_locked_run_dir(smoke_run, tmp_path):
    run, _ = smoke_run
    lock = run.path("run.lock")
    lock.write_text("1")  # pid 1 is always alive
    try:
        proc = subprocess.run([sys.executable, "-m", "bts", "run", "smoke", "--run-dir", str(run.root)],
                              capture_output=True, text=True, timeout=120)
    finally:
        lock.unlink()
    assert proc.returncode == 2
    assert "in use by process 1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, fragment", [
    (["run", "no-such-recipe"], "neither a YAML file nor a built-in recipe"),
    (["run", "smoke", "stitch.train.stpes=3"], "did you mean 'steps'"),
    (["run", "smoke", "stitch.train.lr=-1"], "stitch.train.lr must be positive"),
    (["run", "smoke", "--stages", "bogus"], "unknown stage"),
    (["run", "smoke", "data.mixed_docs=web"], "data.mixed_docs must be auto, builtin, fixture or off"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, args, fragment):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "bts", *args, "--run-dir", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and lines[0].startswith("bts: error:")
    assert not out.exists() or not any(p for p in out.rglob("*") if p.name != "run.lock")


def test_overrides_may_follow_options(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bts", "run", "smoke", "--run-dir", str(tmp_path / "r"),
                           "stitch.train.stpes=3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "did you mean 'steps'" in proc.stderr


def test_a_changed_recipe_is_refused_in_an_existing_run_dir(smoke_run):
    run, _ = smoke_run
    before = run.path("recipe.yaml").read_text()
    proc = subprocess.run([sys.executable, "-m", "bts", "run", "smoke", "--run-dir", str(run.root),
                           "stitch.train.steps=99"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "was made with stitch.train.steps=20, not 99" in proc.stderr
    assert run.path("recipe.yaml").read_text() == before


def test_a_run_from_python_loads_models_quietly(smoke_run, capfd):
    """transformers' per-load progress bars stay off while the pipeline runs, also without the `bts` command."""
    run, results = smoke_run
    run.path("eval", "seed.json").unlink()
    run.path("stages", "evaluate.json").unlink()
    run.path("stages", "downstream.json").unlink()  # evaluate rewrites results.json; downstream adds its section
    capfd.readouterr()
    again = Run(load_recipe("smoke"), run.root).all(["evaluate", "downstream"])
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "seed" in err and "downstream" in again
    strip = {m: {k: v for k, v in e.items() if k != "eval_wall_s"} for m, e in results["methods"].items()}
    assert {m: {k: v for k, v in e.items() if k != "eval_wall_s"} for m, e in again["methods"].items()} == strip


# ---- the modularity stage (last: it adds to the shared smoke run) --------------------------------------------------
@pytest.fixture(scope="module")
def modularity_run(smoke_run):
    """The modularity stage on the finished smoke run: only the modularity settings change, so no other stage
    reruns (a changed modularity section is allowed in an existing run directory)."""
    run, _ = smoke_run
    # leftovers of an interrupted stage with other settings must not be resumed into this one
    run.path("modularity", "train", "stale").mkdir(parents=True)
    run.path("modularity", "settings.json").write_text('{"add_fraction": 0.5}')
    again = Run(load_recipe("smoke", ["modularity.enabled=true"]), run.root)
    again.all()
    assert not run.path("modularity", "train", "stale").exists()
    return again, json.loads(run.path("modularity", "results.json").read_text())


def test_modularity_stage_reports_numbers_from_its_results(modularity_run):
    run, m = modularity_run
    experts = run.recipe.expert_domains
    assert m["schema"] == "bts.pipeline.modularity/1" and set(m["remove"]) == set(experts)
    assert run.done("modularity")["settings"]["enabled"] is True
    assert m["add"]["init_avg_loss_diff"] <= 1e-4  # an added expert changes nothing before it trains
    for d, entry in m["sparse"].items():
        assert [r["k"] for r in entry["k"]] == [1, 2, 3, 4]
        assert entry["k"][-1]["change_pct"] == 0  # all experts active is the full model exactly
        assert entry["k"][0]["experts"][0] in experts
    md = run.path("report", "report.md").read_text()
    html = run.path("report", "report.html").read_text()
    last = experts[-1]
    for value in (f"{m['add']['added_all'][last]:.4f}", f"{m['remove']['code']['retrained']['prose']:.4f}",
                  f"{m['seed']['math']:.4f}", f"{m['switch']['before']:.0%}"):
        assert value in md and value in html
    k1 = sum(e["k"][0]["change_pct"] for e in m["sparse"].values()) / len(m["sparse"])
    assert f"the loss changed by {k1:+.2f}% on average" in md
    for title in ("Modularity (a)", "Modularity (b)", "Modularity (c)", "Modularity: sparse inference",
                  "does the leading expert switch", "Who feeds the hub, per domain"):
        assert md.count(title) == 1, title
    assert run.path("report", "modularity.png").read_bytes()[:4] == b"\x89PNG"
    assert "settings.json" in {p.name for p in run.path("modularity").iterdir()}


def test_modularity_stage_is_not_redone_and_its_tables_print(modularity_run):
    from bts.pipeline.modularity import markdown_tables

    run, m = modularity_run
    marker = run.path("stages", "modularity.json").read_text()
    run.all(["modularity"])
    assert run.path("stages", "modularity.json").read_text() == marker
    assert f"{m['remove']['math']['removed']['legal']:.4f}" in markdown_tables(m)


def test_modularity_stage_needs_the_stitched_model(tmp_path):
    from bts.pipeline.stages import modularity

    run = Run(load_recipe("smoke", ["modularity.enabled=true"]), tmp_path)
    with pytest.raises(BTSError, match="needs the stitched model"):
        modularity(run)


def test_stitch_stage_needs_the_seed_and_experts(tmp_path):
    """`--stages stitch` on a fresh run directory names the stages to run first (not a missing model folder)."""
    from bts.pipeline.stages import stitch

    run = Run(load_recipe("smoke"), tmp_path)
    with pytest.raises(BTSError, match=r"stage stitch needs the seed and every expert; run seed, expert:"):
        stitch(run)


def test_a_glob_matching_nothing_in_the_last_domain_writes_nothing(tmp_path):
    """Checked before the first domain is read: the run directory is not created, so the fixed recipe can use it."""
    from bts.cli import main

    run_dir = tmp_path / "run"
    nothing = tmp_path / "nothing" / "*.jsonl"
    assert main(["run", "smoke", "--run-dir", str(run_dir),
                 f"data.domains.extra={{source: files, files: ['{nothing}']}}"]) == 2
    assert not run_dir.exists()


def test_logging_and_checkpoint_settings_may_change_over_a_run_dir(smoke_run):
    """log_every / ckpt_every / report_to do not change what a phase trains: a finished run accepts them."""
    run, _ = smoke_run
    proc = subprocess.run([sys.executable, "-m", "bts", "run", "smoke", "--run-dir", str(run.root),
                           "stitch.train.log_every=7", "seed_model.train.ckpt_every=3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
