"""lm-evaluation-harness (0.4.13, the optional `eval` extra) on bts models and bts's offline tasks.

    lm = as_lm_eval_model(stitched, tokenizer, batch_size=8)
    tasks_dir = write_lm_eval_tasks()                     # YAMLs over the cached jsonl files (docs: ecosystem.md §2)
    from lm_eval import simple_evaluate
    simple_evaluate(model=lm, tasks=["bts_mmlu_math"], task_manager=task_manager(tasks_dir))

Task names carry a "bts_" prefix so they never shadow lm-eval's own (hub-backed) tasks of the same name. Metrics
are lm-eval's native ones (its `hf_evaluate` metrics need the hub), except answer likelihood, whose per-character
NLL comes from `process_answer_ll` below (lm-eval's `perplexity` overflows on multi-token answers). HumanEval generation is not exported
(lm-eval would run the code unsandboxed); use `bts eval --tasks humaneval`, which runs it in bts's sandbox.
lm_eval is imported inside the functions so that bts works without the extra.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from bts.atomic import atomic_write_text
from bts.core.device import check_members_dtype, members_dtype, resolve_device
from bts.eval.downstream.scoring import GSM8K_STOPS, _device, model_max_length
from bts.eval.downstream.tasks import TASKS, default_cache_dir, ensure_tasks, parse_task_list
from bts.errors import BTSError

PREFIX = "bts_"
LM_EVAL_KINDS = ("mc", "answer_ll", "gen_number")
UTILS_MODULE = "bts_task_utils"  # written next to the YAMLs: lm-eval resolves `!function` relative to them


class _Function(str):
    """A YAML `!function module.name` reference (lm-eval imports it from the YAML's folder)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def process_answer_ll(doc: dict, results: list) -> dict:
    """lm-eval's `loglikelihood` output gives the answer's summed log-likelihood but no token count, and its
    native `perplexity` (exp of minus that sum) overflows on multi-token answers. So report the NLL per character
    of the answer, which is also comparable across tokenizers, plus the raw sum and greedy-match rate."""
    loglikelihood, greedy = results[0]
    return {"nll_per_char": -loglikelihood / max(1, len(doc["answer"])), "loglikelihood": loglikelihood,
            "greedy": float(greedy)}


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise BTSError("lm-eval is not installed; install the extra with: pip install 'bts[eval]' "
                       "(or pip install 'lm-eval[hf]==0.4.13').") from None


def as_lm_eval_model(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """An lm-eval HFLM around an in-memory model (any PreTrainedModel, the stitched one included)."""
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:  # lm-eval would try to load one from the model's (empty) name_or_path
        raise BTSError("tokenizer: lm-eval needs the model's tokenizer (got None).")
    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                max_length=model_max_length(model, tokenizer, max_length), device=str(_device(model)))


def task_manager(tasks_dir, include_defaults: bool = False):
    """An lm-eval TaskManager over bts's YAMLs. Indexing lm-eval's ~14k built-in YAMLs takes ~25 s on 2 cores and
    they need the hub anyway, so they are left out unless asked for."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir), include_defaults=include_defaults)


def _metric(name: str, aggregation: str, higher: bool, **extra) -> dict:
    # aggregation and higher_is_better spelled out: lm-eval warns about every default it has to assume.
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher, **extra}


def task_config(task: str, data_dir: Path) -> dict:
    spec = TASKS[task]
    files = {"test": str((data_dir / f"{task}.jsonl").resolve())}
    pool = data_dir / f"{task}.fewshot.jsonl"
    config = {"task": PREFIX + task, "tag": [f"{PREFIX}{spec.domain}"], "dataset_path": "json",
              "dataset_kwargs": {"data_files": files}, "test_split": "test",
              "metadata": {"version": 1, "domain": spec.domain}}
    if pool.exists() and pool.stat().st_size > 0:
        files["fewshot"] = str(pool.resolve())
        config["fewshot_split"] = "fewshot"
    if spec.kind == "mc":
        config.update(output_type="multiple_choice", doc_to_text="query", doc_to_choice="choices",
                      doc_to_target="gold", target_delimiter="", fewshot_delimiter="\n\n",
                      metric_list=[_metric("acc", "mean", True), _metric("acc_norm", "mean", True)])
    elif spec.kind == "answer_ll":
        config.update(output_type="loglikelihood", doc_to_text="prompt", doc_to_target="answer",
                      target_delimiter="", fewshot_delimiter="\n\n",
                      process_results=_Function(f"{UTILS_MODULE}.process_answer_ll"),
                      metric_list=[_metric("nll_per_char", "mean", False), _metric("loglikelihood", "mean", True),
                                   _metric("greedy", "mean", True)])
    elif spec.kind == "gen_number":
        # As lm-eval's gsm8k "flexible-extract": the last number of the completion against the number after ####.
        config.update(output_type="generate_until", doc_to_text="prompt", doc_to_target="answer",
                      target_delimiter="", fewshot_delimiter="\n\n",
                      generation_kwargs={"until": list(GSM8K_STOPS), "do_sample": False, "max_gen_toks": 256},
                      filter_list=[{"name": "flexible-extract", "filter": [
                          {"function": "regex", "group_select": -1, "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                          {"function": "take_first"}]}],
                      metric_list=[_metric("exact_match", "mean", True, ignore_case=True, ignore_punctuation=False,
                                           regexes_to_ignore=[",", r"\$", r"(?s).*#### ", r"\.$"])])
    else:
        raise BTSError(f"tasks: '{task}' cannot run under lm-eval (it executes model-written code); "
                       f"use `bts eval --tasks {task}`.")
    return config


def write_lm_eval_tasks(out_dir=None, data_dir=None, tasks=None) -> Path:
    """Write one lm-eval YAML per task (all lm-eval-compatible tasks by default); returns the folder."""
    names = parse_task_list(tasks) if tasks else [t for t, s in TASKS.items() if s.kind in LM_EVAL_KINDS]
    data_dir = Path(data_dir) if data_dir else ensure_tasks(names)
    out = Path(out_dir) if out_dir else default_cache_dir() / "lm_eval_tasks"
    atomic_write_text(out / f"{UTILS_MODULE}.py", "from bts.eval.downstream.lmeval import process_answer_ll  # noqa: F401\n")
    for task in names:
        text = yaml.dump(task_config(task, data_dir), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
        atomic_write_text(out / f"{PREFIX}{task}.yaml", text)
    return out


def cli(argv: list[str]) -> int:
    """lm-eval's own command line, after `import bts` (which registers the stitched model type with
    transformers), with --include_path defaulting to bts's offline tasks when any bts_* task is requested."""
    _require_lm_eval()
    import sys

    import bts  # noqa: F401  (registers model_type "bts" with AutoModelForCausalLM)
    from lm_eval.__main__ import cli_evaluate

    argv = device_argv(list(argv))
    requested = _flag_value(argv, "--tasks") or ""
    bare = [t for t in requested.split(",") if t in TASKS]  # bts's own name without lm-eval's prefix
    if bare:
        raise BTSError(f"--tasks names '{bare[0]}', which lm-eval knows as '{PREFIX}{bare[0]}' (bts's offline tasks "
                       f"carry the {PREFIX} prefix here; `bts eval` takes the bare names).")
    wanted = [t.removeprefix(PREFIX) for t in requested.split(",") if t.startswith(PREFIX)]
    if wanted and _flag_value(argv, "--include_path") is None:
        argv += ["--include_path", str(write_lm_eval_tasks(tasks=[t for t in wanted if t in TASKS] or None))]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local json tasks only: fail fast instead of retrying
    old = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        result = cli_evaluate()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = old
    return int(result or 0) if isinstance(result, int) else 0


def device_argv(argv: list[str]) -> list[str]:
    """lm-eval's arguments with bts's device choice made explicit: `--device` resolved by bts.core.device (auto:
    this machine's GPU when there is one; CUDA asked for where there is none is refused in one sentence), and
    bts's `--members-dtype` (auto: bfloat16 on a GPU, float32 on a CPU) passed as `dtype=` in --model_args unless
    those already name a dtype."""
    if any(a in ("-h", "--help") for a in argv):
        return argv
    spec = _flag_value(argv, "--members-dtype")
    argv = _without_flag(argv, "--members-dtype")
    check_members_dtype(spec or "auto", "--members-dtype")
    device = resolve_device(_flag_value(argv, "--device") or "auto", "--device")
    argv = [*_without_flag(argv, "--device"), "--device", str(device)]
    model_args = _flag_value(argv, "--model_args")
    if model_args is not None and not model_args.lstrip().startswith("{") and "dtype=" not in model_args:
        dtype = str(members_dtype(spec or "auto", device)).removeprefix("torch.")
        argv = [*_without_flag(argv, "--model_args"), "--model_args", f"{model_args},dtype={dtype}".lstrip(",")]
    return argv


def _without_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == flag:
            skip = i + 1 < len(argv)
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None
