"""lm-eval 0.4.13 offline on bts's local tasks: a stitched model at its start-as-hub initialisation must score
exactly like its hub, sample by sample."""

import sys

import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval")

from bts import BTSForCausalLM  # noqa: E402
from bts.eval.downstream import lmeval  # noqa: E402
from bts.eval.downstream.tasks import FIXTURES  # noqa: E402
from bts.errors import BTSError  # noqa: E402
from helpers import tiny_members, tiny_tokenizer  # noqa: E402

TASKS = ["mmlu_math", "gsm8k_ll", "gsm8k"]


def _run(model, tok, manager):
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lmeval.as_lm_eval_model(model, tok, batch_size=4),
                          tasks=[lmeval.PREFIX + t for t in TASKS], num_fewshot=1, task_manager=manager, limit=3, log_samples=True,
                          gen_kwargs={"max_gen_toks": 6}, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                          fewshot_random_seed=0)
    samples = {t: [s["resps"] for s in rows] for t, rows in out["samples"].items()}
    return out["results"], samples


def test_stitched_model_at_start_matches_hub_under_lm_eval(tmp_path):
    tok = tiny_tokenizer()
    hub, experts = tiny_members(vocab_size=len(tok), n=2, max_position_embeddings=256)
    stitched = BTSForCausalLM.from_members(hub, experts, num_stitches=2)
    tasks_dir = lmeval.write_lm_eval_tasks(tmp_path / "yaml", data_dir=FIXTURES, tasks=TASKS)
    manager = lmeval.task_manager(tasks_dir)
    hub_results, hub_samples = _run(hub, tok, manager)
    bts_results, bts_samples = _run(stitched, tok, manager)
    assert set(hub_results) == {lmeval.PREFIX + t for t in TASKS}
    assert hub_results["bts_mmlu_math"]["acc,none"] is not None
    assert "exact_match,flexible-extract" in hub_results["bts_gsm8k"]
    assert hub_results["bts_gsm8k_ll"]["nll_per_char,none"] > 0
    assert hub_samples == bts_samples  # every log-likelihood and every generated string
    strip = lambda r: {t: {k: v for k, v in m.items() if k != "alias"} for t, m in r.items()}  # noqa: E731
    assert strip(hub_results) == strip(bts_results)


def test_yaml_spells_out_metrics_and_uses_local_files(tmp_path):
    folder = lmeval.write_lm_eval_tasks(tmp_path, data_dir=FIXTURES, tasks=["hellaswag", "humaneval_ll"])
    hs = yaml.safe_load((folder / "bts_hellaswag.yaml").read_text())
    assert hs["dataset_path"] == "json" and hs["output_type"] == "multiple_choice"
    assert hs["dataset_kwargs"]["data_files"]["fewshot"].endswith("hellaswag.fewshot.jsonl")
    assert all({"aggregation", "higher_is_better"} <= set(m) for m in hs["metric_list"])
    he = (folder / "bts_humaneval_ll.yaml").read_text()
    assert "fewshot_split" not in he  # HumanEval has no pool: zero-shot only
    assert "process_results: !function 'bts_task_utils.process_answer_ll'" in he


def test_code_execution_tasks_are_refused(tmp_path):
    with pytest.raises(BTSError, match="humaneval"):
        lmeval.write_lm_eval_tasks(tmp_path, data_dir=FIXTURES, tasks=["humaneval"])


def test_launcher_passes_arguments_through(monkeypatch, tmp_path):
    seen = {}

    def fake_cli():
        seen["argv"] = list(sys.argv)
        return None

    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", fake_cli)
    monkeypatch.setattr(lmeval, "write_lm_eval_tasks", lambda tasks=None: tmp_path / "tasks")
    assert lmeval.cli(["--model", "hf", "--tasks", "bts_gsm8k_ll,arc_easy", "--limit", "2"]) == 0
    assert seen["argv"][1:] == ["--model", "hf", "--tasks", "bts_gsm8k_ll,arc_easy", "--limit", "2",
                                "--device", "cpu", "--include_path", str(tmp_path / "tasks")]  # bts's device choice
    lmeval.cli(["--tasks", "bts_gsm8k_ll", "--include_path", "mine"])
    assert seen["argv"][1:] == ["--tasks", "bts_gsm8k_ll", "--include_path", "mine", "--device", "cpu"]  # an
    # explicit path wins


def test_bts_lm_eval_subcommand_forwards_every_argument(monkeypatch):
    from bts.cli import main

    seen = {}
    monkeypatch.setattr(lmeval, "cli", lambda argv: seen.setdefault("argv", argv) and 0)
    assert main(["lm-eval", "--model", "hf", "--model_args", "pretrained=x", "-h", "--tasks", "arc_easy"]) == 0
    assert seen["argv"] == ["--model", "hf", "--model_args", "pretrained=x", "-h", "--tasks", "arc_easy"]


def test_a_bts_task_without_its_prefix_is_named_with_it(capsys):
    """`bts eval` takes mmlu_math; lm-eval knows it as bts_mmlu_math: one sentence saying so, not a traceback."""
    from bts.cli import main

    assert main(["lm-eval", "--model", "hf", "--model_args", "pretrained=nowhere", "--tasks", "mmlu_math",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bts: error: --tasks names 'mmlu_math', which lm-eval knows as 'bts_mmlu_math'")
    assert "\n" not in err
