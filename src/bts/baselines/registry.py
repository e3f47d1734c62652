"""The baselines of the paper behind one interface, registered by name (recipe `baselines.methods`).

    REGISTRY["btx_top2"].build(run) -> marker info;  REGISTRY["btx_top2"].load(path, info) -> (model, accounting)

`run` is the pipeline's run (bts.pipeline.run.Run): recipe, path(), domains, stream(), batcher(), stitch_mix().

Methods (recipe `baselines.methods`; names as they appear in results.json):
  soup, task_arithmetic, ties, dare     weight merges (no training); λ / density / drop rate from the recipe, or,
                                        with baselines.sweep, chosen on the *validation* split (never held-out)
  btx_top2, btx_sampled_top1, btx_soft  BTX MoE (seed + experts as MoE experts, the rest averaged), trained on the
                                        stitch datamix for the stitch's steps and batch size (same token budget)
  btm                                   BTM ensemble, uniform prior (as the BTS paper); no training
  routing                               sequence-level routing, router trained on the stitch datamix for the
                                        stitch's steps at a constant learning rate; routes on each window's first
                                        `ROUTE_PREFIX` tokens, then scores the whole window with that member
"""

from __future__ import annotations

import dataclasses
import functools
import json

import torch

from bts.data.streams import eval_windows
from bts.eval.heldout import heldout_loss
from bts.train import distributed
from bts.errors import BTSError
from bts.train.loop import train

MERGES = {"soup": "soup", "task_arithmetic": "task_arithmetic", "ties": "ties", "dare": "dare_ties"}
BTX = {"btx_top2": "top2", "btx_sampled_top1": "sampled_top1", "btx_soft": "soft"}
METHODS = (*MERGES, *BTX, "btm", "routing")
ROUTE_PREFIX = 32  # tokens the router sees: the "prompt" of each scored window
SWEEPS = {"task_arithmetic": ("lam", (0.25, 0.5, 1.0)), "ties": ("density", (0.2, 0.5, 0.8)),
          "dare": ("lam", (0.25, 0.5, 1.0))}


def _members(run) -> tuple[str, list[str]]:
    return str(run.path("models", "seed")), [str(run.path("models", f"expert-{d}")) for d in run.recipe.expert_domains]


def _merge_params(run, method: str) -> dict:
    b = run.recipe.baselines
    return {"soup": {}, "task_arithmetic": {"lam": b.merge_lambda}, "ties": {"density": b.ties_density},
            "dare": {"drop_rate": b.dare_drop_rate, "lam": b.merge_lambda}}[method]


# ---- merges ------------------------------------------------------------------------------------------------
def _build_merge(run, method: str) -> dict:
    from bts.baselines.merges import merge_models, save_merged

    seed, experts = _members(run)
    params = _merge_params(run, method)
    chosen = {}
    if run.recipe.baselines.sweep and method in SWEEPS:
        key, grid = SWEEPS[method]
        windows = {d: eval_windows(run.stream(d, "val"), run.recipe.data.seq_len, 8192) for d in run.domains}
        scores = {}
        for value in grid:
            model = merge_models(seed, experts, MERGES[method], **{**params, key: value})
            scores[value] = sum(heldout_loss(model, w) for w in windows.values()) / len(windows)
        best = min(scores, key=scores.get)
        params[key] = best
        chosen = {"sweep": {key: {str(v): round(s, 4) for v, s in scores.items()}}, "selected_on": "val"}
    model = merge_models(seed, experts, MERGES[method], **params)
    if distributed.is_main():  # under torchrun every rank builds it; rank 0 writes it
        save_merged(model, seed, run.path("models", method), force=True)
    return {"params": params, **chosen}


# ---- BTX ---------------------------------------------------------------------------------------------------
def _train_btx(run, method: str) -> dict:
    from bts.baselines.btx import btx_parameter_counts, btx_trainable_parameters, build_btx, save_btx, set_btx_step

    seed, experts = _members(run)
    model = build_btx(seed, experts, routing=BTX[method], seed_rng=run.recipe.seed)
    b = run.recipe.baselines
    cfg = _btx_budget(run.recipe)  # the stitch's steps, batch and schedule
    trainable = btx_trainable_parameters(model, b.btx_trainable)
    counts = btx_parameter_counts(model)
    result = train(model, trainable, run.batcher(run.stitch_mix(), cfg, salt=7), cfg, run.path("train", method),
                   desc=method, seed=run.recipe.seed, step_hook=functools.partial(set_btx_step, model))
    if distributed.is_main():
        save_btx(model, run.path("models", method), force=True, tokenizer_from=seed)
    return {"tokens": result.tokens, "train_wall_s": result.wall_s, "final_loss": result.final_loss,
            "trainable_params": counts["trainable"], "total_params": counts["total"], "active_params": counts["active"]}


# ---- BTM and routing ---------------------------------------------------------------------------------------
def _build_btm(run) -> None:
    from bts.baselines.btm import BTMEnsemble

    seed, experts = _members(run)
    model = BTMEnsemble.from_members([seed, *experts], names=["seed", *run.recipe.expert_domains])
    if distributed.is_main():
        model.save_pretrained(run.path("models", "btm"))


def _train_routing(run) -> dict:
    from bts.baselines.routing import RoutedModel, routing_loss_fn

    seed, experts = _members(run)
    model = RoutedModel.from_members([seed, *experts], names=["seed", *run.recipe.expert_domains])
    cfg = _routing_budget(run.recipe)  # the paper's constant learning rate; the stitch's steps and batch size
    trainable = {f"router.{k}": p for k, p in model.router.named_parameters()}
    result = train(model, trainable, run.batcher(run.stitch_mix(), cfg, salt=7), cfg, run.path("train", "routing"),
                   desc="routing", seed=run.recipe.seed, loss_fn=routing_loss_fn)
    if distributed.is_main():
        model.save_pretrained(run.path("models", "routing"))
    return {"tokens": result.tokens, "train_wall_s": result.wall_s, "final_loss": result.final_loss}


class _RouteOnPrefix(torch.nn.Module):
    """Scores a window with the member the router picks from the window's first tokens only (no peeking at the
    tokens being predicted)."""

    def __init__(self, routed):
        super().__init__()
        self.routed = routed

    def forward(self, input_ids, **kwargs):
        choice = self.routed.choose(input_ids[:, :ROUTE_PREFIX])
        return self.routed(input_ids=input_ids, choice=choice, **kwargs)


def _merge_info(path) -> dict:
    f = path / "bts_merge.json"
    if not f.exists():
        return {}
    data = json.loads(f.read_text())
    return {"merge": {k: v for k, v in data.items() if k != "members"}}


# ---- the interface -----------------------------------------------------------------------------------------
class Baseline:
    """A baseline method: `build(run)` makes (and, if trained, trains) it under run.path("models", name) and
    returns what its stage marker records; `load(path, info)` gives the model to evaluate and its parameter
    accounting; `budget(recipe)` is the training phase it used (None: no training) and its peak lr."""

    def __init__(self, name: str, build, load, budget=None):
        self.name, self._build, self._load, self._budget = name, build, load, budget

    def build(self, run) -> dict:
        return self._build(run, self.name) or {}

    def load(self, path, info: dict):
        return self._load(self.name, path, info)

    def budget(self, recipe):
        return self._budget(recipe) if self._budget else None

    @property
    def trained(self) -> bool:
        return self._budget is not None


def _load(method: str, path, info: dict):
    if method in MERGES:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        n = sum(p.numel() for p in model.parameters())
        return model, {"trainable_params": 0, "total_params": n, "active_params": n, **_merge_info(path)}
    if method in BTX:
        from bts.baselines.btx import load_btx

        model = load_btx(path)
        return model, {k: info[k] for k in ("trainable_params", "total_params", "active_params")}
    if method == "btm":
        from bts.baselines.btm import BTMEnsemble

        model = BTMEnsemble.from_pretrained(path).eval()
        c = model.param_counts()
        return model, {"trainable_params": c["trainable"], "total_params": c["total"], "active_params": c["active"]}
    from bts.baselines.routing import RoutedModel

    model = RoutedModel.from_pretrained(path).eval()
    c = model.param_counts()
    return _RouteOnPrefix(model), {"trainable_params": c["trainable"], "total_params": c["total"],
                                   "active_params": c["active"]}


def _btx_budget(recipe):
    return dataclasses.replace(recipe.stitch.train, lr=recipe.baselines.btx_lr)


def _routing_budget(recipe):
    return dataclasses.replace(recipe.stitch.train, lr=recipe.baselines.routing_lr, warmup=0, min_lr_ratio=1.0)


REGISTRY: dict[str, Baseline] = {
    **{m: Baseline(m, _build_merge, _load) for m in MERGES},
    **{m: Baseline(m, _train_btx, _load, _btx_budget) for m in BTX},
    "btm": Baseline("btm", lambda run, name: _build_btm(run), _load),
    "routing": Baseline("routing", lambda run, name: _train_routing(run), _load, _routing_budget),
}
