"""Score any causal LM on the downstream tasks of `bts.eval.downstream.tasks`.

    section = evaluate_tasks({"seed": (hub, tok), "bts": (stitched, tok)}, ["mmlu_math", "gsm8k_ll"], "out/",
                             limit=50, fewshot=5)
    print(markdown_table(section))

A model is anything called as `model(input_ids=..., attention_mask=...)` that returns `.logits` (or ["logits"]):
HF models, the stitched model, merges, BTX, and wrappers such as a BTM ensemble whose "logits" are already
log-probabilities — scores use log_softmax, which leaves log-probabilities unchanged. Generation tasks use the
model's `generate()` when it has one (KV cache, batched with left padding) and a plain greedy loop otherwise.

Scores go to `section["scores"][method][task]`, one number per task (its primary metric); per-sample records go to
`<out>/samples/<method>/<task>.jsonl` so any number can be traced back to the texts behind it.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bts.atomic import atomic_write_json, atomic_write_text
from bts.core.device import model_device
from bts.eval.downstream import sandbox
from bts.eval.downstream.tasks import TASKS, TaskSpec, ensure_tasks, load_task, parse_task_list
from bts.errors import BTSError

HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
GSM8K_STOPS = ["\n\n", "Question:"]


# ---- model plumbing --------------------------------------------------------------------------------------------
def _device(model) -> torch.device:
    """Where the model is: its batches are built there (bts.core.device.model_device; the CPU for a stand-in)."""
    return model_device(model) if hasattr(model, "parameters") else torch.device("cpu")


def model_max_length(model, tokenizer, max_length: int | None = None) -> int:
    if max_length:
        return int(max_length)
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if n:
        return int(n)
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n and n < 1_000_000 else 2048


def _logits(model, input_ids, attention_mask) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out["logits"]


def _prefix(tokenizer) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None else []


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation, as they are tokenised together.

    The continuation's ids are the tail of encode(context + continuation), so a space moved across the boundary
    or a merge at it is tokenised the way the model would see it in running text (lm-eval does the same)."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    ctx = tokenizer.encode(stripped, add_special_tokens=False) if stripped else []
    whole = tokenizer.encode(stripped + continuation, add_special_tokens=False)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else tokenizer.encode(continuation, add_special_tokens=False)
    prefix = _prefix(tokenizer) or ([] if ctx else [tokenizer.eos_token_id])
    return prefix + ctx, cont


@torch.inference_mode()
def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8, max_length: int | None = None,
                   desc: str | None = None) -> list[dict]:
    """For each (context, continuation): {"logprob": sum of log p(continuation tokens), "tokens": how many were
    scored, "greedy": whether each was the argmax, "truncated": whether the left of the context was cut}."""
    max_len = model_max_length(model, tokenizer, max_length)
    device = _device(model)
    rows = []
    for ctx, cont in pairs:
        c_ids, t_ids = encode_pair(tokenizer, ctx, cont)
        if not t_ids:
            raise BTSError(f"continuation: '{cont}' tokenises to nothing; cannot score it.")
        tokens = c_ids + t_ids
        inp, tgt = tokens[:-1][-max_len:], tokens[1:][-max_len:]
        rows.append((inp, tgt, min(len(t_ids), len(inp)), len(tokens) - 1 > max_len))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths together: less padding
    results: list[dict | None] = [None] * len(rows)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None or not sys.stderr.isatty(), leave=False):
        idx = order[start:start + batch_size]
        width = max(len(rows[i][0]) for i in idx)
        # Right padding, built by hand (whatever the tokenizer's padding_side): real tokens keep positions
        # 0..len-1, and causal attention keeps pads from influencing them.
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, :len(rows[i][0])] = torch.tensor(rows[i][0])
            mask[b, :len(rows[i][0])] = 1
        logits = _logits(model, ids.to(device), mask.to(device))
        for b, i in enumerate(idx):
            inp, tgt, n, truncated = rows[i]
            pos = torch.arange(len(inp) - n, len(inp), device=logits.device)
            logp = torch.log_softmax(logits[b, pos].float(), dim=-1)
            target = torch.tensor(tgt[-n:], device=logits.device)
            chosen = logp.gather(-1, target[:, None])[:, 0]
            results[i] = {"logprob": float(chosen.sum()), "tokens": n,
                          "greedy": bool((logp.argmax(-1) == target).all()), "truncated": truncated}
    return results


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], stop: list[str], max_new_tokens: int = 256, batch_size: int = 8,
             max_length: int | None = None, desc: str | None = None) -> list[str]:
    """Greedy completions, each cut at the first stop string."""
    max_len = model_max_length(model, tokenizer, max_length)
    keep = max(1, max_len - max_new_tokens)
    encoded = [(_prefix(tokenizer) + tokenizer.encode(p, add_special_tokens=False))[-keep:] for p in prompts]
    device = _device(model)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    outputs: list[str | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    step = batch_size if hasattr(model, "generate") else 1
    for start in tqdm(range(0, len(order), step), desc=desc, disable=desc is None or not sys.stderr.isatty(), leave=False):
        idx = order[start:start + step]
        if hasattr(model, "generate"):
            new = _hf_generate(model, tokenizer, [encoded[i] for i in idx], pad, eos, max_new_tokens, stop, device)
        else:
            new = [_greedy_loop(model, tokenizer, encoded[idx[0]], eos, max_new_tokens, stop, device)]
        for i, ids in zip(idx, new):
            outputs[i] = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)
    return outputs


def _hf_generate(model, tokenizer, batch, pad, eos, max_new_tokens, stop, device) -> list[list[int]]:
    width = max(len(x) for x in batch)
    # Left padding so every prompt ends at the last column; generate() derives position ids from the mask.
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad, eos_token_id=eos, stop_strings=stop or None, tokenizer=tokenizer)
    return [row[width:].tolist() for row in out]


def _greedy_loop(model, tokenizer, ids, eos, max_new_tokens, stop, device) -> list[int]:
    """For models without generate() (e.g. ensembles): no KV cache, one sequence at a time."""
    new = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids + new], device=device)
        token = int(_logits(model, x, torch.ones_like(x))[0, -1].argmax())
        if token == eos:
            break
        new.append(token)
        if stop and any(s in tokenizer.decode(new, skip_special_tokens=True) for s in stop):
            break
    return new


def cut_at_stop(text: str, stop: list[str]) -> str:
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


# ---- prompts ---------------------------------------------------------------------------------------------------
def render_shot(spec: TaskSpec, item: dict) -> str:
    if spec.kind == "mc":
        return item["query"] + item["choices"][item["gold"]]
    return item["prompt"] + item["answer"]


def fewshot_prefix(spec: TaskSpec, item: dict, pool: list[dict], k: int, seed: int) -> str:
    """k solved examples from the task's held-out pool (same MMLU subject when possible), chosen by a generator
    seeded with (seed, task, item id) so an item's prompt does not depend on which other items are evaluated."""
    if k <= 0 or not pool:
        return ""
    candidates = [p for p in pool if p["id"] != item["id"]]
    same = [p for p in candidates if "group" in item and p.get("group") == item["group"]]
    candidates = same if len(same) >= k else candidates
    rng = random.Random(f"{seed}:{spec.name}:{item['id']}")
    shots = rng.sample(candidates, min(k, len(candidates)))
    return "".join(render_shot(spec, s) + "\n\n" for s in shots)


# ---- metrics ---------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer a GSM8K solution commits to: the number after '####' if present, else the last number."""
    text = text.split("####")[-1] if "####" in text else text
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "").replace("$", "").rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return None
    return str(int(number)) if number == int(number) else str(number)


def run_code_tests(items: list[dict], completions: list[str], timeout: float = 10.0, workers: int = 4) -> list[dict]:
    """Run each completion with its HumanEval tests in the sandbox."""
    def one(pair):
        item, completion = pair
        result = sandbox.run_python(sandbox.humaneval_program(item["prompt"], completion, item["test"],
                                                              item["entry_point"]), timeout=timeout)
        return {"passed": result.passed, "status": result.status, "stderr": result.stderr[-2000:]}
    with ThreadPoolExecutor(max_workers=workers) as pool:  # each run is its own process: threads only wait
        return list(pool.map(one, zip(items, completions)))


# ---- one task --------------------------------------------------------------------------------------------------
def evaluate_task(model, tokenizer, task: str, data_dir, *, limit: int | None = None, fewshot: int = 0,
                  seed: int = 1234, batch_size: int = 8, max_length: int | None = None,
                  max_new_tokens: int = 256, samples_path=None, desc: str | None = None) -> dict:
    """{metric: value, ..., "n": items scored} for one task; per-sample records written to samples_path."""
    spec = TASKS[task]
    items, pool = load_task(task, data_dir)
    items = items[:limit] if limit else items
    prefixes = [fewshot_prefix(spec, item, pool, fewshot, seed) for item in items]
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        if spec.kind == "mc":
            scores, samples = _score_mc(model, tokenizer, items, prefixes, batch_size, max_length, desc)
        elif spec.kind == "answer_ll":
            scores, samples = _score_answer(model, tokenizer, items, prefixes, batch_size, max_length, desc)
        else:
            stops = GSM8K_STOPS if spec.kind == "gen_number" else HUMANEVAL_STOPS
            prompts = [p + item["prompt"] for p, item in zip(prefixes, items)]
            completions = generate(model, tokenizer, prompts, stops, max_new_tokens, batch_size, max_length, desc)
            scores, samples = _score_generations(spec, items, prompts, completions)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    if samples_path is not None:
        atomic_write_text(samples_path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    return {**scores, "n": len(items)}


def _score_mc(model, tokenizer, items, prefixes, batch_size, max_length, desc):
    pairs = [(p + it["query"], c) for p, it in zip(prefixes, items) for c in it["choices"]]
    lls = loglikelihoods(model, tokenizer, pairs, batch_size, max_length, desc)
    samples, acc, acc_norm, k = [], 0, 0, 0
    for p, it in zip(prefixes, items):
        ll = [x["logprob"] for x in lls[k:k + len(it["choices"])]]
        k += len(it["choices"])
        # acc_norm divides by the choice's length in characters (as lm-eval does), so long answers are not
        # penalised just for having more tokens.
        norm = [v / max(1, len(c)) for v, c in zip(ll, it["choices"])]
        pred, pred_norm = max(range(len(ll)), key=ll.__getitem__), max(range(len(ll)), key=norm.__getitem__)
        acc += pred == it["gold"]
        acc_norm += pred_norm == it["gold"]
        samples.append({"id": it["id"], "context": p + it["query"], "choices": it["choices"], "gold": it["gold"],
                        "logprobs": ll, "pred": pred, "pred_norm": pred_norm})
    n = max(1, len(items))
    return {"acc": acc / n, "acc_norm": acc_norm / n}, samples


def _score_answer(model, tokenizer, items, prefixes, batch_size, max_length, desc):
    pairs = [(p + it["prompt"], it["answer"]) for p, it in zip(prefixes, items)]
    lls = loglikelihoods(model, tokenizer, pairs, batch_size, max_length, desc)
    samples = [{"id": it["id"], "context": ctx, "answer": ans, "nll": -x["logprob"] / x["tokens"], **x}
               for it, (ctx, ans), x in zip(items, pairs, lls)]
    total_tokens = sum(x["tokens"] for x in lls)
    return {"nll": sum(s["nll"] for s in samples) / max(1, len(samples)),
            "nll_token_weighted": -sum(x["logprob"] for x in lls) / max(1, total_tokens),
            "tokens": total_tokens}, samples


def _score_generations(spec, items, prompts, completions):
    if spec.kind == "gen_number":
        preds = [final_number(c) for c in completions]
        hits = [p is not None and p == final_number(it["target"]) for p, it in zip(preds, items)]
        samples = [{"id": it["id"], "prompt": pr, "completion": c, "pred": p, "target": it["target"], "correct": h}
                   for it, pr, c, p, h in zip(items, prompts, completions, preds, hits)]
        return {"exact_match": sum(hits) / max(1, len(items))}, samples
    runs = run_code_tests(items, completions)
    samples = [{"id": it["id"], "prompt": pr, "completion": c, **r}
               for it, pr, c, r in zip(items, prompts, completions, runs)]
    return {"pass@1": sum(r["passed"] for r in runs) / max(1, len(items))}, samples


# ---- many models, many tasks -----------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def evaluate_tasks(models: dict, tasks, out_dir, limit: int | None = None, fewshot: int = 0, seed: int = 1234, *,
                   batch_size: int = 8, max_length: int | None = None, data_dir=None,
                   max_new_tokens: int = 256) -> dict:
    """Score every model on every task. models: {method: (model, tokenizer) or a function returning that pair}.
    Returns the results.json section
    {"tasks": {task: {"domain", "metric", "higher_is_better", "n"}}, "scores": {method: {task: value}},
    "settings": {...}} and writes it (downstream.json, with every metric), downstream.md and the samples."""
    tasks = parse_task_list(tasks)
    if not models:
        raise BTSError("models: no model to evaluate (empty dict).")
    if fewshot < 0:
        raise BTSError(f"fewshot must be >= 0 (got {fewshot}).")
    if limit is not None and limit <= 0:
        raise BTSError(f"limit must be a positive number of items (got {limit}).")
    data_dir = Path(data_dir) if data_dir else ensure_tasks(tasks)
    out = Path(out_dir)
    section = {"tasks": {}, "scores": {}, "settings": {"limit": limit, "fewshot": fewshot, "seed": seed,
                                                       "data_dir": str(data_dir)}}
    details: dict[str, dict] = {}
    for method, entry in models.items():
        # A loader (zero-argument callable) keeps one model in memory at a time: a stitched model holds n+1.
        model, tokenizer = entry() if callable(entry) else entry
        section["scores"][method], details[method] = {}, {}
        for task in tasks:
            spec = TASKS[task]
            result = evaluate_task(model, tokenizer, task, data_dir, limit=limit, fewshot=fewshot, seed=seed,
                                   batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens,
                                   samples_path=out / "samples" / _safe(method) / f"{task}.jsonl",
                                   desc=f"{method} {task}")
            section["tasks"][task] = {"domain": spec.domain, "metric": spec.metric,
                                      "higher_is_better": spec.higher_is_better, "n": result["n"]}
            section["scores"][method][task] = result[spec.metric]
            details[method][task] = result
        del model
    atomic_write_json(out / "downstream.json", {**section, "details": details})
    atomic_write_text(out / "downstream.md", markdown_table(section))
    return section


def markdown_table(section: dict) -> str:
    """Rows = methods, columns = tasks grouped by domain, then the average of the higher-is-better columns;
    the best value of each column in bold (lowest for NLL)."""
    tasks = sorted(section["tasks"], key=lambda t: (section["tasks"][t]["domain"], t))
    info = section["tasks"]
    methods = list(section["scores"])
    up = [t for t in tasks if info[t]["higher_is_better"]]
    avg = {m: (sum(section["scores"][m][t] for t in up) / len(up) if up else math.nan) for m in methods}
    columns = [(f"{info[t]['domain']}: {t} ({info[t]['metric']}{'' if info[t]['higher_is_better'] else ' ↓'})",
                {m: section["scores"][m].get(t, math.nan) for m in methods}, info[t]["higher_is_better"])
               for t in tasks]
    if up:
        columns.append(("Avg (↑ columns)", avg, True))
    lines = ["| Method | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    cells = {m: [] for m in methods}
    for _, values, higher in columns:
        finite = [v for v in values.values() if not math.isnan(v)]
        best = (max if higher else min)(finite) if finite else None
        for m in methods:
            v = values[m]
            text = "–" if math.isnan(v) else f"{v:.4f}" if not higher else f"{100 * v:.1f}"
            cells[m].append(f"**{text}**" if best is not None and v == best and len(methods) > 1 else text)
    lines += [f"| {m} | " + " | ".join(cells[m]) + " |" for m in methods]
    return "\n".join(lines) + "\n"
