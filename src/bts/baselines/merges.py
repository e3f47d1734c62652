"""Weight-merge baselines (not in the BTS paper, which uses soup only): model soup, task arithmetic, TIES, DARE (linear and TIES).

All merges work on the members' state dicts one tensor at a time, with τ_i = θ_i − θ_seed:

- soup:            θ = mean(θ_seed, θ_1, …, θ_n)
- task_arithmetic: θ = θ_seed + λ · Σ_i τ_i
- ties:            trim each τ_i to its top `density` fraction by |τ|, elect a sign per entry (sign of the sum of
                   the trimmed τ_i), then θ = θ_seed + λ · (mean of the trimmed entries agreeing with that sign)
- dare_linear:     drop each entry of τ_i with probability p, scale survivors by 1/(1−p), θ = θ_seed + λ · Σ_i τ_i
- dare_ties:       the same drop and rescale, then TIES sign election (no magnitude trim)

Defaults mirror mergekit 0.1.5 (`merge_methods/registry.py`, `generalized_task_arithmetic.py`) so the numbers can be
checked against it: λ = 1.0 for every method; `normalize` (divide the combined delta by the number of contributing
experts, per entry for the TIES methods) is on for ties and off for task_arithmetic, dare_linear and dare_ties.
mergekit's own trim/drop defaults (density 1.0) disable trimming and dropping, so here they follow the papers
instead: TIES keeps the top 20% (Yadav et al. 2023, k = 20); DARE drops p = 0.5, the rate of mergekit's examples,
because the DARE paper shows high rates (0.9) fail on large deltas such as continued-pretraining experts.

Two deliberate differences from mergekit: DARE rescales survivors by exactly 1/(1−p) as in the DARE paper
(mergekit rescales each τ_i to keep its L1 norm, which is 1/(1−p) only in expectation), and its drop mask is drawn
from a generator seeded by (random_seed, expert, tensor name), so a merge is reproducible whatever the tensor order.
Arithmetic runs in float32 (float64 for float64 weights) and is cast back to the seed's dtype.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from bts.baselines.base import Baseline, run_members, write_model_dir
from bts.core.device import load_kwargs
from bts.core.members import Member, check_compatible, load_causal_lm, load_config, resolve_dir
from bts.errors import BTSError

METHODS = ("soup", "task_arithmetic", "ties", "dare_linear", "dare_ties")
TIES_DENSITY = 0.2
DARE_DROP_RATE = 0.5
NORMALIZE = {"task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False}
# Which optional knobs each method reads; passing one a method ignores is an error, not a silent no-op.
USES = {
    "soup": set(),
    "task_arithmetic": {"lam", "normalize"},
    "ties": {"lam", "normalize", "density"},
    "dare_linear": {"lam", "normalize", "drop_rate"},
    "dare_ties": {"lam", "normalize", "drop_rate"},
}
FLAG = {"lam": "lambda", "normalize": "normalize", "density": "density", "drop_rate": "drop_rate",
        "random_seed": "random_seed"}


# --------------------------------------------------------------------------------------------- parameters


def resolve_params(method: str, *, lam=None, density=None, drop_rate=None, normalize=None, random_seed=None,
                   names: dict | None = None) -> dict:
    """Validate the merge settings and fill in the method's defaults; returns the full settings used. Errors name
    each setting as `names` says (default FLAG, the command line's; a recipe passes its dotted keys)."""
    if method not in METHODS:
        raise BTSError(f"method '{method}' is not a weight merge (choose one of: {', '.join(METHODS)}).")
    flag = {**FLAG, **(names or {})}
    given = {"lam": lam, "density": density, "drop_rate": drop_rate, "normalize": normalize}
    for name, value in given.items():
        if value is not None and name not in USES[method]:
            raise BTSError(f"{flag[name]}={value} is not used by method '{method}'.")
    params: dict = {"method": method}
    if method == "soup":
        return params
    lam = 1.0 if lam is None else lam
    # λ ≤ 0 would return the seed (0) or subtract the experts (< 0): task negation, not a merge.
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise BTSError(f"{flag['lam']}={lam} must be a finite number > 0.")
    params["lam"] = float(lam)
    normalize = NORMALIZE[method] if normalize is None else normalize
    if not isinstance(normalize, bool):
        raise BTSError(f"{flag['normalize']}={normalize} must be true or false.")
    params["normalize"] = normalize
    if method == "ties":
        density = TIES_DENSITY if density is None else density
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise BTSError(f"{flag['density']}={density} must be in (0, 1] (the fraction of each task vector kept).")
        params["density"] = float(density)
    if method.startswith("dare"):
        drop_rate = DARE_DROP_RATE if drop_rate is None else drop_rate
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise BTSError(f"{flag['drop_rate']}={drop_rate} must be in [0, 1) (the probability of dropping an entry).")
        params["drop_rate"] = float(drop_rate)
        random_seed = 0 if random_seed is None else random_seed
        if isinstance(random_seed, bool) or not isinstance(random_seed, int):
            raise BTSError(f"{flag['random_seed']}={random_seed} must be an integer.")
        params["random_seed"] = random_seed
    return params


# ------------------------------------------------------------------------------------------ one tensor


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries largest in magnitude (at least one), zero the rest."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))  # int(), not round(): mergekit's count, so results match it exactly
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    # Equal magnitudes at the cut are common (deltas of weights near 1.0 are float-quantised); which one survives
    # is arbitrary, so break such ties the way mergekit does (the same argsort call) to keep results comparable.
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return delta * mask.reshape(delta.shape)


def _drop(delta: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: zero each entry with probability p and scale the survivors by 1/(1−p)."""
    if p == 0:
        return delta
    keep = (torch.rand(delta.shape, generator=generator) >= p).to(delta.device)  # drawn on the CPU: device-free
    return torch.where(keep, delta / (1 - p), torch.zeros((), dtype=delta.dtype))


def _generator(random_seed: int, expert: int, key: str) -> torch.Generator:
    # Seeded per tensor (sha256 is stable across processes, unlike hash()) so the order of keys does not matter.
    digest = hashlib.sha256(f"{random_seed}/{expert}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def merge_tensor(key: str, seed: torch.Tensor, experts: list[torch.Tensor], params: dict) -> torch.Tensor:
    """Merge one tensor; `params` comes from `resolve_params`. Non-float tensors are the seed's."""
    if not seed.is_floating_point():
        return seed.clone()
    work = torch.float64 if seed.dtype == torch.float64 else torch.float32
    base = seed.to(work)
    method = params["method"]
    if method == "soup":
        total = base.clone()
        for t in experts:
            total.add_(t.to(base.device, work))
        return total.div_(len(experts) + 1).to(seed.dtype)

    deltas = []
    for i, t in enumerate(experts):
        delta = t.to(base.device, work) - base
        if method == "ties":
            delta = _trim(delta, params["density"])
        elif method.startswith("dare"):
            delta = _drop(delta, params["drop_rate"], _generator(params["random_seed"], i, key))
        deltas.append(delta)
    deltas = torch.stack(deltas)  # summing a stack (not a Python loop) keeps mergekit's reduction order

    if method in ("ties", "dare_ties"):
        elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(work)  # a zero sum elects +, as in TIES/mergekit
        agree = (deltas.sign() == elected).to(work)  # trimmed/dropped zeros have sign 0 and never agree
        mixed = (deltas * agree).sum(dim=0)
        count = agree.sum(dim=0)
        divisor = torch.where(count == 0, torch.ones_like(count), count)
    else:
        mixed = deltas.sum(dim=0)
        divisor = torch.full_like(mixed, float(len(experts)))
    if params["normalize"]:
        mixed = mixed / divisor
    if params["lam"] != 1:
        mixed = mixed * params["lam"]
    return (base + mixed).to(seed.dtype)


# ------------------------------------------------------------------------------------------ state dicts


def _alias_id(t: torch.Tensor):
    """Identity of a tensor's memory: tied weights (Qwen2's embed_tokens/lm_head) share one."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _iter_merged(seed_sd: Mapping, expert_sds: list[Mapping], params: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, merged tensor) for every tensor of the seed that is not an alias of an earlier one."""
    seen = set()
    for key, seed_t in seed_sd.items():
        alias = _alias_id(seed_t)
        if alias is not None:
            if alias in seen:
                continue  # a tied weight: merged once, through its first name
            seen.add(alias)
        tensors = []
        for i, sd in enumerate(expert_sds):
            if key not in sd:
                raise BTSError(f"expert {i} has no tensor '{key}'; all members must share one architecture.")
            t = sd[key]
            if tuple(t.shape) != tuple(seed_t.shape):
                raise BTSError(f"expert {i} tensor '{key}' has shape {tuple(t.shape)} but the seed has "
                               f"{tuple(seed_t.shape)}; all members must share one architecture.")
            tensors.append(t)
        yield key, merge_tensor(key, seed_t, tensors, params)


def merge_state_dicts(seed_sd: Mapping, expert_sds: list[Mapping], method: str, **params) -> dict:
    """Merge state dicts (name -> tensor) into a new one with the seed's keys.

    params: lam, density, drop_rate, normalize, random_seed (see `resolve_params`). Tied names in `seed_sd` (one
    storage under two names) stay tied in the result. Keys only the experts have are ignored.
    """
    settings = resolve_params(method, **params)
    if not expert_sds:
        raise BTSError("experts: at least one expert is needed (n = 0 given).")
    out, first_of = {}, {}
    merged = dict(_iter_merged(seed_sd, list(expert_sds), settings))
    for key, seed_t in seed_sd.items():
        alias = _alias_id(seed_t)
        if key in merged:
            out[key] = merged[key]
            first_of.setdefault(alias, key)
        else:
            out[key] = out[first_of[alias]]
    return out


# ------------------------------------------------------------------------------------------ models


class CheckpointTensors(Mapping):
    """A model directory's safetensors weights as a read-on-demand mapping, so experts never sit whole in memory."""

    def __init__(self, model_dir: str | os.PathLike, role: str):
        from safetensors import safe_open

        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise BTSError(f"{role} directory '{model_dir}' has no .safetensors weights (bts reads safetensors only).")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _checkpoint_dtype(spec) -> torch.dtype | None:
    """The dtype a model directory was saved in (config.json), or None when it cannot tell."""
    from transformers import AutoConfig

    try:
        dtype = AutoConfig.from_pretrained(resolve_dir(str(spec), "seed")).dtype
    except Exception:
        return None  # load_causal_lm reports the real problem
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _expert_source(spec, i: int) -> tuple[Mapping, Member]:
    role = f"expert {i}"
    if isinstance(spec, nn.Module):
        model, path = load_causal_lm(spec, role)
        return model.state_dict(), Member(f"expert{i}", model, path)
    model_dir, config = load_config(spec, role)
    # check_compatible reads only `.config`; the weights are streamed tensor by tensor instead of loaded.
    return CheckpointTensors(model_dir, role), Member(f"expert{i}", SimpleNamespace(config=config), str(model_dir))


def merge_models(seed, experts: list, method: str, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, **params) -> nn.Module:
    """Merge a seed and its experts (model directories or loaded *ForCausalLM models) into a new model.

    The result is a model of the seed's class and config (weights in `dtype`, by default the seed's own) on
    `device` (default: the seed's; a seed directory is read straight onto it). A loaded seed is copied, never
    modified. Expert directories are read one tensor at a time, each moved to the device as it is merged.
    """
    settings = resolve_params(method, **params)  # fail on bad settings before loading anything
    if not experts:
        raise BTSError("experts: at least one expert is needed (n = 0 given).")
    if dtype is None and not isinstance(seed, nn.Module):
        dtype = _checkpoint_dtype(seed)
    if isinstance(seed, nn.Module):
        seed_model, seed_dir = load_causal_lm(seed, "seed", dtype=dtype)
        out = copy.deepcopy(seed_model)
        if device is not None:
            out.to(device)
    else:
        seed_model, seed_dir = load_causal_lm(seed, "seed", dtype=dtype, device=device)
        out = seed_model
    if dtype is not None:
        out.to(dtype)
    sources = [_expert_source(spec, i) for i, spec in enumerate(experts)]
    check_compatible(Member("seed", seed_model, seed_dir), [m for _, m in sources])
    seed_tied = bool(getattr(out.config, "tie_word_embeddings", False))
    for i, (_, m) in enumerate(sources):
        tied = bool(getattr(m.model.config, "tie_word_embeddings", False))
        if tied != seed_tied:
            raise BTSError(f"expert {i} has tie_word_embeddings={tied} but the seed has "
                           f"tie_word_embeddings={seed_tied}; all members must share one architecture.")
    state = out.state_dict()
    with torch.no_grad():
        # Overwrite the copy in place, tensor by tensor: each seed value is read just before it is replaced.
        for key, merged in _iter_merged(state, [sd for sd, _ in sources], settings):
            state[key].copy_(merged)
    out.eval()
    out._bts_merge = {**settings, "seed": seed_dir, "experts": [m.path for _, m in sources]}
    return out


def save_merged(model: nn.Module, tokenizer_src_dir: str | os.PathLike | None, out_dir: str | os.PathLike, *,
                force: bool = False) -> Path:
    """Write `model` as a Hugging Face model directory, with the seed's tokenizer files copied byte for byte.

    Written as bts.baselines.base.write_model_dir does: an error leaves nothing behind and `out_dir` is either
    untouched or complete. A non-empty `out_dir` is replaced only with force=True.
    """
    out = Path(out_dir)
    check_out_dir(out, force)
    info = getattr(model, "_bts_merge", None)
    return write_model_dir(model, out, tokenizer_from=tokenizer_src_dir,
                           record=("bts_merge.json", info) if info is not None else None)


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BTSError(f"out '{out}' exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BTSError(f"out directory '{out}' is not empty; pass --force (force=True) to replace it.")


# ---- the merge baselines ------------------------------------------------------------------------------------------
class MergeBaseline(Baseline):
    """A weight merge of the seed and the experts (no training). Its settings come from the recipe
    (baselines.merge_lambda, ties_density, dare_drop_rate) or, with baselines.sweep, the one in `sweep` is chosen on
    the *validation* split (never held-out) from its grid, by the mean loss over the domains."""

    RECIPE_KEYS = {"lam": "merge_lambda", "density": "ties_density", "drop_rate": "dare_drop_rate"}

    def __init__(self, name: str, method: str, settings: tuple[str, ...] = (), sweep: tuple | None = None):
        super().__init__(name)
        self.method, self.settings, self.sweep = method, settings, sweep  # sweep: (setting, grid)
        self.options = tuple(self.RECIPE_KEYS[k] for k in settings) + (("sweep",) if sweep else ())

    def params(self, options) -> dict:
        return {k: getattr(options, self.RECIPE_KEYS[k]) for k in self.settings}

    def check(self, options, prefix: str = "baselines.") -> None:
        resolve_params(self.method, **self.params(options), names={k: prefix + v for k, v in self.RECIPE_KEYS.items()})

    def build(self, run) -> dict:
        from bts.data.streams import eval_windows
        from bts.eval.heldout import heldout_loss
        from bts.train import distributed

        seed, experts = run_members(run)
        params = self.params(run.recipe.baselines)
        chosen = {}
        if run.recipe.baselines.sweep and self.sweep:
            key, grid = self.sweep
            windows = {d: eval_windows(run.stream(d, "val"), run.recipe.data.seq_len, 8192) for d in run.domains}
            scores = {}
            for value in grid:
                model = merge_models(seed, experts, self.method, device=run.device, **{**params, key: value})
                scores[value] = sum(heldout_loss(model, w) for w in windows.values()) / len(windows)
            best = min(scores, key=scores.get)
            params[key] = best
            chosen = {"sweep": {key: {str(v): round(s, 4) for v, s in scores.items()}}, "selected_on": "val"}
        model = merge_models(seed, experts, self.method, device=run.device, **params)
        if distributed.is_main():  # under torchrun every rank builds it; rank 0 writes it
            save_merged(model, seed, run.model_dir(self.name), force=True)
        return {"params": params, **chosen}

    def load(self, path, info: dict, device=None, dtype=None):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **load_kwargs(device)).eval()
        n = sum(p.numel() for p in model.parameters())
        record = Path(path) / "bts_merge.json"  # what save_merged wrote: the settings used
        merge = {k: v for k, v in json.loads(record.read_text()).items() if k != "members"} if record.exists() else None
        return model, {"trainable_params": 0, "total_params": n, "active_params": n,
                       **({"merge": merge} if merge is not None else {})}


LAMBDAS = (0.25, 0.5, 1.0)
BASELINES = (
    MergeBaseline("soup", "soup"),
    MergeBaseline("task_arithmetic", "task_arithmetic", ("lam",), sweep=("lam", LAMBDAS)),
    MergeBaseline("ties", "ties", ("density",), sweep=("density", (0.2, 0.5, 0.8))),
    MergeBaseline("dare", "dare_ties", ("drop_rate", "lam"), sweep=("lam", LAMBDAS)),
)
