"""The pipeline's stages, one function each, in pipeline order (PIPELINE); `run_stages` runs them over a Run.

A stage function written with @stage(marker) runs inside RunDir.stage (which writes stages/<marker>.json when it
completes) unless its marker says it finished already; that skipping is written once, here. Under torchrun every
rank runs the parallel stages (they train) and rank 0 alone runs the others while the rest wait.

Stages record in their marker what the report needs and cannot read elsewhere: trained phases their `budget` (data,
steps, batch, seq_len, peak lr); the evaluate stage writes eval/gates.json (the stitched model's gates per domain
and on a text that switches domain), so the report (bts.report) reads files only and loads no model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import torch

from bts import faults
from bts.atomic import atomic_write_json
from bts.core.calibrate import CALIBRATION_SALT, calibrate_from
from bts.data import corpora
from bts.data.streams import eval_windows
from bts.errors import BTSError
from bts.eval.heldout import heldout_loss
from bts.pipeline import mixed as mixed_docs
from bts.pipeline.budgets import budget
from bts.pipeline.given import check_lora_targets
from bts.pipeline.loaders import count_params, load_bts, load_hf, quiet_libraries
from bts.pipeline.rundir import WRITE_ERRNOS, log, marker_name
from bts.train import distributed, lora
from bts.train.loop import train


def stage(marker: str, *, when: Callable | None = None, still_done: Callable | None = None,
          prepare: Callable | None = None):
    """Decorator: fn(run, info, *args) runs inside run.dir.stage(marker) unless that stage finished before.
    marker may hold {} for the argument ("expert:{}" -> expert:code); when(run): whether the stage applies at
    all; still_done(run, marker_info): whether a finished stage still counts (default: yes); prepare(run, *args):
    checks and readies the run directory before the stage starts (and raises when it cannot run)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run_stage(run, *args):
            if when is not None and not when(run):
                return
            name = marker.format(*args)
            done = run.done(name)
            if done is not None and (still_done is None or still_done(run, done)):
                return
            if prepare is not None:
                prepare(run, *args)
            with run.dir.stage(name) as info:
                fn(run, info, *args)
        return run_stage
    return wrap


# ---- the stages, in pipeline order --------------------------------------------------------------------------
@stage("data")
def data(run, info) -> None:
    from bts.data.prepare import prepare_domain

    fractions = tuple(run.recipe.data.split_fractions)
    for name, spec in run.recipe.data.domains.items():  # streamed to disk in bounded memory (bts.data.prepare)
        got = prepare_domain(name, spec, run.path("data", name), fractions=fractions,
                             seed=run.recipe.data.split_seed)
        if got["replaced_bytes"]:
            log(f"warning: data.domains.{name}: {got['replaced_bytes']} byte(s) that are not UTF-8 were replaced "
                f"by U+FFFD (in {', '.join(got['replaced_in'])})")
        atomic_write_json(run.path("data", name, "provenance.json"), _provenance(name, spec, got))
        info[name] = {split: c["documents"] for split, c in got["splits"].items()}
        info[name]["chars"] = {split: c["chars"] for split, c in got["splits"].items()}
        faults.point(f"data:{name}")


def _provenance(name: str, spec, got: dict) -> dict:
    if spec.source == "builtin":
        prov = dict(corpora.provenance(name))
    elif spec.source == "fixture":
        prov = dict(corpora.fixture_provenance(name))
    else:
        prov = {"source": spec.source, "files": spec.files, "dataset": spec.dataset, "license": "user-provided"}
    prov["documents_used"] = got["documents"]
    prov["chars_used"] = got["chars"]
    if got["replaced_bytes"]:
        prov["replaced_bytes"] = got["replaced_bytes"]
    return prov


def tokenizer(run) -> None:
    """The run's BPE tokenizer (RunData.tokenizer trains it, and writes the marker, unless the recipe gives a seed
    model, whose tokenizer it uses), then the token shards of every split (bts.data.shards)."""
    run.tokenizer()
    run.shards()


@stage("seed")
def seed(run, info) -> None:
    out = run.model_dir("seed")
    rs = run.recipe.seed_model
    if rs.path:  # a given pretrained seed: referenced by folder and weights hash, never copied
        from bts.pipeline.given import seed_reference

        info.update(seed_reference(rs.path))  # with its card (seed.json), when it has one
        return
    tok = run.tokenizer()
    info["budget"] = budget(run, "seed")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(run.recipe.seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=rs.hidden_size, num_hidden_layers=rs.num_layers,
                         num_attention_heads=rs.num_heads, num_key_value_heads=rs.num_kv_heads,
                         intermediate_size=rs.intermediate_size,
                         max_position_embeddings=max(512, run.recipe.data.seq_len),
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    trainable = dict(model.named_parameters())
    batches = run.batcher(run.seed_mix(), rs.train, salt=1)
    result = train(model, trainable, batches, rs.train, run.path("train", "seed"), desc="seed",
                   seed=run.recipe.seed, device=run.device,  # initialised on the CPU (the same draw anywhere)
                   metrics_fn=run.val_curve(model, rs.val_tokens) if rs.val_tokens else None)
    if distributed.is_main():
        model.save_pretrained(out)
        tok.save_pretrained(out)
    info.update(trained=True, params=count_params(model), tokens=result.tokens, train_wall_s=result.wall_s,
                final_loss=result.final_loss)


def _needs_seed(run, domain: str) -> None:
    if not run.done("seed"):
        raise BTSError(f"stage expert:{domain} needs the seed model; run the seed stage first.")


@stage("expert:{}", prepare=_needs_seed)
def expert(run, info, domain: str) -> None:
    from transformers import AutoModelForCausalLM

    if domain in run.recipe.experts.paths:  # a given expert: referenced, not trained
        from bts.pipeline.given import reference

        info.update(reference(run.recipe.experts.paths[domain], f"experts.paths.{domain}"))
        return
    from bts.core.device import load_kwargs

    ex, cfg = run.recipe.experts, run.recipe.experts.train_config()
    # Every weight trains (or LoRA adapters on them): fp32 master weights, read straight onto the run's device.
    model = AutoModelForCausalLM.from_pretrained(run.model_dir("seed"), dtype=torch.float32,
                                                 **load_kwargs(run.device))
    salt = 100 + run.domains.index(domain)
    if ex.lora.r:  # adapters on the seed copy, merged into its weights after training (bts.train.lora)
        model, trainable = lora.add_adapters(model, r=ex.lora.r, alpha=ex.lora.alpha, targets=ex.lora.targets,
                                             dropout=ex.lora.dropout, train_embeddings=ex.lora.train_embeddings,
                                             seed=run.recipe.seed + salt)
        info["lora_params"] = lora.lora_params(trainable)
    else:
        if not ex.train_embeddings:
            model.get_input_embeddings().requires_grad_(False)
            model.get_output_embeddings().requires_grad_(False)
        trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    result = train(model, trainable, run.batcher({domain: 1.0}, cfg, salt), cfg,
                   run.path("train", f"expert-{domain}"), desc=f"expert:{domain}", seed=run.recipe.seed,
                   device=run.device)
    if ex.lora.r:
        model = lora.merge_adapters(model)
    out = run.model_dir(f"expert-{domain}")
    if distributed.is_main():
        model.save_pretrained(out)
        run.tokenizer().save_pretrained(out)
    info.update(tokens=result.tokens, train_wall_s=result.wall_s, final_loss=result.final_loss,
                params=count_params(model), trained_params=sum(p.numel() for p in trainable.values()),
                budget=budget(run, f"expert:{domain}"))


def _needs_members(run) -> None:
    missing = [f"expert:{d}" for d in run.recipe.expert_domains if not run.done(f"expert:{d}")]
    if not run.done("seed") or missing:
        stages = ", ".join((["seed"] if not run.done("seed") else []) + missing)
        raise BTSError(f"stage stitch needs the seed and every expert; run {stages} first (or the whole recipe).")


@stage("stitch", prepare=_needs_members)
def stitch(run, info) -> None:
    from bts.eval.gates import gate_summary

    cfg = run.recipe.stitch.train
    model = run.build_stitched()
    model.set_execution(checkpoint_members=run.recipe.stitch.checkpoint_members)
    trainable = model.named_stitch_parameters()
    mix = run.stitch_mix()
    if run.recipe.stitch.init == "lstsq":  # W_proj fitted before training (a resumed run's checkpoint then wins)
        info["lstsq"] = calibrate_from(model, run.batcher(mix, cfg, salt=CALIBRATION_SALT),
                                       run.recipe.stitch.init_batches, run.recipe.stitch.init_ridge)
    probe = run.mixed_heldout(max_tokens=2 * run.recipe.data.seq_len)

    def gate_stats():
        return {"gates": gate_summary(model, probe)}

    result = train(model, trainable, run.batcher(mix, cfg, salt=7), cfg, run.path("train", "stitch"),
                   desc="stitch", seed=run.recipe.seed, metrics_fn=gate_stats, device=run.device)
    if distributed.is_main():
        model.save_pretrained(run.model_dir("bts"))
        run.tokenizer().save_pretrained(run.model_dir("bts"))
    info.update(tokens=result.tokens, train_wall_s=result.wall_s, final_loss=result.final_loss,
                trainable_params=sum(p.numel() for p in trainable.values()), mix=mix)
    info["budget"] = budget(run, "stitch")


@stage("baseline:{}")
def baseline(run, info, method: str) -> None:
    from bts.baselines.registry import REGISTRY

    info.update(REGISTRY[method].build(run))
    trained = budget(run, f"baseline:{method}")
    if trained is not None:
        info["budget"] = trained


def methods(run) -> dict:
    """Every evaluated method: name -> (loader, accounting info). Loaders build the model on demand."""
    from bts.baselines.registry import REGISTRY

    on = {"device": run.device, "dtype": run.members_dtype}  # every evaluated model: on the run's device
    found = {"seed": (lambda: load_hf(run.model_dir("seed"), **on), run.done("seed") or {})}
    for d in run.recipe.expert_domains:
        found[f"expert:{d}"] = (functools.partial(_load_expert, run, d, on), run.done(f"expert:{d}") or {})
    if run.done("stitch"):
        found["bts"] = (lambda: load_bts(run.model_dir("bts"), **on), run.done("stitch") or {})
    for method in run.recipe.baselines.methods:
        info = run.done(f"baseline:{method}")
        if info is not None:
            found[method] = (functools.partial(REGISTRY[method].load, run.model_dir(method), info, **on), info)
    return found


def _load_expert(run, domain: str, on: dict):
    """An expert and its accounting: what its stage trained (LoRA adapters, or the blocks only without
    embeddings), when the marker says."""
    model, accounting = load_hf(run.model_dir(f"expert-{domain}"), **on)
    trained = (run.done(f"expert:{domain}") or {}).get("trained_params")
    return model, {**accounting, "trainable_params": trained} if trained is not None else accounting


@stage("evaluate")
def evaluate(run, info) -> None:
    seq, budget_tokens = run.recipe.data.seq_len, run.recipe.data.eval_tokens
    windows = {d: eval_windows(run.stream(d, "heldout"), seq, budget_tokens) for d in run.domains}
    mixed = eval_windows(run.mixed_heldout(), seq)
    docs = mixed_docs.mixed_windows(run)  # natural mixed-document sets (bts.pipeline.mixed)
    results = {"schema": "bts.results/1", "recipe": run.recipe.name, "domains": run.domains,
               "expert_domains": run.recipe.expert_domains, "seq_len": seq,
               "mixed_docs": mixed_docs.describe(run, docs), "methods": {}}
    for name, (load, stage_info) in methods(run).items():
        cached = run.path("eval", f"{marker_name(name)}.json")
        entry = _read_cached(cached)
        if entry is not None and set(docs) <= set(entry.get("mixed_docs_loss", {})):
            results["methods"][name] = entry
            continue
        t0 = time.perf_counter()
        model, accounting = load()
        losses = {d: heldout_loss(model, w) for d, w in windows.items()}
        entry = {"heldout_loss": losses, "avg_heldout_loss": sum(losses.values()) / len(losses),
                 "mixed_heldout_loss": heldout_loss(model, mixed), **accounting,
                 "mixed_docs_loss": {s: heldout_loss(model, w) for s, w in docs.items()}}
        for key in ("tokens", "train_wall_s"):
            if key in stage_info:
                entry["train_" + key if key == "tokens" else key] = stage_info[key]
        entry["eval_wall_s"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(cached, entry)
        faults.point(f"evaluate:{name}")
        results["methods"][name] = entry
        log(f"  {name:<22} avg held-out loss {entry['avg_heldout_loss']:.4f}")
        del model
    if "bts" in results["methods"]:
        write_gates(run)
    atomic_write_json(run.path("results.json"), results)


def write_gates(run) -> None:
    """eval/gates.json: the stitched model's mean mixing weights per domain and E→H stitch (on up to 8 held-out
    windows per domain), and per token on a text that switches domain (the report's table and heatmap)."""
    out = run.path("eval", "gates.json")
    if out.exists() and not mixed_docs.gates_stale(run, out):
        return
    from bts.eval.gates import gate_table, heatmap

    model, _ = load_bts(run.model_dir("bts"), run.device, run.members_dtype)
    seq = run.recipe.data.seq_len
    table = gate_table(model, {d: eval_windows(run.stream(d, "heldout"), seq, 8 * seq) for d in run.domains})
    ids, bounds = run.switch_text()
    gates = {"schema": "bts.gates/1", "per_domain": table, "heatmap": heatmap(model, ids, bounds)}
    doc = mixed_docs.heatmap_document(run)  # one natural mixed document: license / comment / docstring / code
    if doc is not None:
        gates["mixed_docs_heatmap"] = {**heatmap(model, doc[0], doc[1]), "document": doc[2]}
    gates["mixed_docs_gates"] = mixed_docs.set_gates(run, model)  # per set, its mean gates (the report's table)
    atomic_write_json(out, gates)


@stage("downstream", when=lambda run: bool(run.recipe.downstream.tasks))
def downstream(run, info) -> None:
    """Downstream tasks (MMLU groups, HellaSwag, GSM8K/HumanEval likelihoods, …) for every method; the section
    is added to results.json under "downstream"."""
    from bts.eval.downstream.scoring import evaluate_tasks

    d = run.recipe.downstream
    data_dir = None
    if d.fixtures:
        from bts.eval.downstream.tasks import FIXTURES

        data_dir = FIXTURES
    tok = run.tokenizer()
    models = {name: (lambda load=load: (load()[0], tok)) for name, (load, _) in methods(run).items()}
    section = evaluate_tasks(models, list(d.tasks), run.path("downstream"), limit=d.limit or None,
                             fewshot=d.fewshot, seed=run.recipe.seed, data_dir=data_dir,
                             max_length=4 * run.recipe.data.seq_len)
    results = json.loads(run.path("results.json").read_text())
    results["downstream"] = section
    atomic_write_json(run.path("results.json"), results)


def _modularity_settings(run) -> dict:
    return dataclasses.asdict(run.recipe.modularity)


def _modularity_ready(run) -> None:
    if not run.done("stitch"):
        raise BTSError("the modularity stage needs the stitched model; run the stitch stage first.")
    if len(run.recipe.expert_domains) < 2:
        raise BTSError(f"the modularity stage needs at least 2 experts (the run has {run.recipe.expert_domains}).")
    # Training checkpoints under modularity/train resume an interrupted measurement exactly, but only with the
    # same settings: anything left by other settings (or by an older bts) is cleared first.
    out, settings = run.path("modularity"), _modularity_settings(run)
    stamp = out / "settings.json"
    if out.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != settings):
        shutil.rmtree(out)
    atomic_write_json(stamp, settings)


@stage("modularity", when=lambda run: run.recipe.modularity.enabled, prepare=_modularity_ready,
       still_done=lambda run, done: done.get("settings") == _modularity_settings(run))
def modularity(run, info) -> None:
    """The modularity measurement (bts.pipeline.modularity.measure_modularity, docs/modularity.md) on this run's
    stitched model, when modularity.enabled: results under modularity/, shown in the report."""
    from bts.pipeline.modularity import measure_modularity

    m = run.recipe.modularity
    results = measure_modularity(run, add_fraction=m.add_fraction, retrain_fraction=m.retrain_fraction,
                                 focus_weight=m.focus_weight, sparse=m.sparse, out=run.path("modularity"))
    info.update(settings=_modularity_settings(run), full_avg=results["full"]["avg"], seed_avg=results["seed"]["avg"])


def report(run) -> None:
    """report/: tables and plots from the run directory's files (bts.report.write_report), after filling in
    what a run directory made by an older bts lacks (eval/gates.json, the budgets of trained phases)."""
    from bts.report import write_report

    with run.dir.stage("report"):
        results = json.loads(run.path("results.json").read_text())
        if "bts" in results["methods"]:
            write_gates(run)
        for phase in ("seed", *(f"expert:{d}" for d in run.recipe.expert_domains), "stitch",
                      *(f"baseline:{m}" for m in run.recipe.baselines.methods)):
            info = run.done(phase)
            if info is not None and "budget" not in info and distributed.is_main():
                trained = budget(run, phase)
                if trained is not None:
                    atomic_write_json(run.path("stages", f"{marker_name(phase)}.json"), {**info, "budget": trained})
        write_report(run.root, stage_order=marker_order(run))


# ---- the pipeline -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable
    parallel: bool = False  # under torchrun every rank runs it (it trains); otherwise rank 0 alone
    each: Callable | None = None  # the step runs fn(run, item) for each item of each(run) ...
    part: str = ""  # ... under the marker part.format(item) ("expert:{}"; `--stages` may name expert parts)

    def run(self, run, wanted: set[str]) -> None:
        if self.each is None:
            if self.name in wanted:
                self.fn(run)
            return
        for item in self.each(run):
            if self.name in wanted or (self.part and self.part.format(item) in wanted):
                self.fn(run, item)


PIPELINE = (
    Step("data", data),
    Step("tokenizer", tokenizer),
    Step("seed", seed, parallel=True),
    Step("experts", expert, parallel=True, each=lambda run: run.recipe.expert_domains, part="expert:{}"),
    Step("stitch", stitch, parallel=True),
    Step("baselines", baseline, parallel=True, each=lambda run: run.recipe.baselines.methods, part="baseline:{}"),
    Step("evaluate", evaluate),
    Step("downstream", downstream),
    Step("modularity", modularity),
    Step("report", report),
)
STAGES = tuple(s.name for s in PIPELINE)
PARALLEL_STAGES = tuple(s.name for s in PIPELINE if s.parallel)


def marker_order(run) -> list[str]:
    """Every stage marker of the run (stages/<name>.json) in pipeline order: data, tokenizer, seed, expert-<d>,
    stitch, baseline-<m>, evaluate, downstream, modularity, report."""
    return [marker_name(m) for step in PIPELINE
            for m in ([step.name] if step.each is None else [step.part.format(x) for x in step.each(run)])]


def run_stages(run, only: list[str] | None = None) -> dict | None:
    """Run the stages (all, or `only`: names from STAGES plus expert:<domain>) in order under the run directory's
    lock; results.json's content when there is one."""
    wanted = set(only or STAGES)
    unknown = wanted - set(STAGES) - {f"expert:{d}" for d in run.recipe.expert_domains}
    if unknown:
        raise BTSError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)} and expert:<domain>.")
    from bts.pipeline.given import check_recipe_members

    if wanted - {"report"}:  # the report reads files only: it needs no member
        check_recipe_members(run.recipe, data=not run.done("data"))  # cheap checks before anything is written
    device = run.device  # a missing GPU is refused here, before anything is written
    check_lora_targets(run)
    try:
        distributed.init(device=device)  # joins the torchrun process group (nccl on GPUs, gloo on the CPU)
        # Expert-only jobs run side by side on one run directory (`bts run --print-expert-commands`): each
        # takes its own lock.
        experts_only = bool(only) and all(s.startswith("expert:") for s in wanted)
        with run.dir.lock("run-" + "-".join(sorted(wanted)).replace(":", "-") if experts_only else "run"), \
                quiet_libraries():
            if distributed.is_main():
                run.dir.write_manifest(run.recipe)
            t0 = time.perf_counter()
            for step in PIPELINE:
                if distributed.active() and not step.parallel:
                    if distributed.is_main():
                        step.run(run, wanted)
                else:
                    step.run(run, wanted)
                distributed.barrier()
            log(f"finished in {time.perf_counter() - t0:.0f}s; run directory: {run.root}")
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise run.dir.write_error(exc) from None
    results = run.path("results.json")
    return json.loads(results.read_text()) if results.exists() else None


def _read_cached(path) -> dict | None:
    """A cached eval entry, or None when absent or damaged (then it is recomputed, never half-read)."""
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
        if isinstance(entry, dict) and "avg_heldout_loss" in entry:
            return entry
    except (ValueError, UnicodeDecodeError):
        pass
    log(f"warning: cached evaluation {path} is damaged; evaluating again")
    return None
