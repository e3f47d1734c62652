"""Growing and shrinking a stitched model: add an expert, remove one (bts.pipeline.modularity measures the cost).

    bigger = add_expert(model, "models/expert-legal", name="legal")     # outputs equal model's (≤ 1e-4)
    smaller = remove_expert(model, "code")                                # usable at once: gates renormalised

Members are frozen and shared: the new model reuses the input model's hub and expert objects (nothing is copied or
reloaded), and only the stitch tensors are rebuilt. Each stitch tensor has a member axis (W_proj_i, the rows of
W_gate, the H→E blend, the E→H presence), so adding or removing an expert is slicing along it (`_member_views`).

Exactness when adding: a new expert gets identity projections and zero gate rows like any fresh stitch, and an E→H
presence weight p = 0 inside the softmax (bts.core.stitch): g_i ∝ p_i·exp(z_i). With p = 0 it has exactly no mass and the
old members keep theirs, but ∂L/∂p ≠ 0, so training opens it at once. p is kept ≥ 0 by projection after each step
(bts.pipeline.modularity.train_stitches; a channel the data pushes below 0 is set back to 0 and stays trainable).

Removing: the expert's slices are dropped; the E→H softmax then renormalises over the remaining members, which is
what sparse inference with those members does too (BTSForCausalLM.set_active_experts).

`new_slot_masks(model, name)` marks one expert's slots in every stitch parameter (training only the new slots).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bts.core.stitch import E2H, H2E, StitchLayer
from bts.errors import BTSError

# ---- the member axis of every stitch tensor -------------------------------------------------------------------


def _member_views(layer: StitchLayer) -> dict[str, tuple[torch.Tensor, int]]:
    """parameter name -> (a view with the member axis first, offset of expert 0 on it: 1 when the hub is row 0).
    The E→H blend is per hub channel (no member axis) and is not listed."""
    n, d = layer.n, layer.d
    views = {"proj": (layer.proj, 0), "gate.weight": (layer.gate.weight.view(n + 1, d, d), 1)}
    if layer.gate.bias is not None:
        views["gate.bias"] = (layer.gate.bias.view(n + 1, d), 1)
    if layer.blend is not None and layer.kind == H2E:
        views["blend"] = (layer.blend, 0)
    if layer.presence is not None:
        views["presence"] = (layer.presence, 1)
    return views


@torch.no_grad()
def _transfer(old: StitchLayer, new: StitchLayer, pairs: list[tuple[int, int]]) -> None:
    """Copy the hub's rows, the per-hub tensors and expert rows old[j] -> new[i] for (i, j) in pairs."""
    if old.blend is not None and old.kind == E2H:
        new.blend.copy_(old.blend)
    old_views = _member_views(old)
    for key, (view, offset) in _member_views(new).items():
        if key not in old_views:  # presence added now: every old member is fully present
            continue
        src, _ = old_views[key]
        if offset:
            view[0] = src[0]
        for i, j in pairs:
            view[i + offset] = src[j + offset]


def _expert_index(model, name: str) -> int:
    names = list(model.config.expert_names)
    if name not in names:
        raise BTSError(f"expert '{name}' is not in this model (experts: {', '.join(names)}).")
    return names.index(name)


def _rebuild(model, experts: list, names: list[str]):
    """A model with the same hub and stitch layout over another list of experts (fresh stitch tensors)."""
    from bts.core.model import BTSForCausalLM

    cfg = model.config
    if cfg.stitch_output != "hub":
        raise BTSError(f"adding or removing experts is not supported with stitch_output '{cfg.stitch_output}' "
                       "(only with the paper's output, 'hub').")
    new = BTSForCausalLM.from_members(
        model.hub, experts, names=names, hub_name=cfg.members[0]["name"], positions=list(cfg.stitch_positions),
        all_e2h=all(k == E2H for k in cfg.stitch_kinds), init=cfg.stitch_init, beta=cfg.stitch_beta,
        gate_dropout=cfg.gate_dropout, expert_stream=cfg.expert_stream)
    if list(new.config.stitch_kinds) != list(cfg.stitch_kinds):  # a hand-edited layout from_members cannot redo
        raise BTSError(f"stitch_kinds {cfg.stitch_kinds} of the model cannot be rebuilt by bts; "
                       "add or remove experts only on models built by bts.")
    new.generation_config = model.generation_config
    new.stitches.to(next(model.stitches.parameters()).device)
    return new.eval()


# ---- add and remove --------------------------------------------------------------------------------------------
def add_expert(model, new_expert, name: str | None = None):
    """A model with one more expert whose outputs equal `model`'s (the new expert starts with presence 0).
    new_expert: a model directory, a cached hub id or a loaded *ForCausalLM branched from the same hub."""
    if name is None:
        name = Path(str(new_expert)).name if not isinstance(new_expert, torch.nn.Module) else "new"
    names = list(model.config.expert_names)
    if name in names or name == model.config.members[0]["name"]:
        raise BTSError(f"name '{name}' is already a member of this model; choose another --name.")
    if not isinstance(new_expert, torch.nn.Module):  # the same weights twice add nothing but cost
        from bts.core.members import resolve_dir, weights_sha256

        digest = weights_sha256(resolve_dir(str(new_expert), "new expert"))
        twin = next((m["name"] for m in model.config.members if m.get("sha256") == digest), None)
        if twin is not None:
            raise BTSError(f"'{new_expert}' has the same weights as member '{twin}', which is already in this model.")
        # Read onto the model's device; in its members' half precision when they are in one (a bf16 model on a
        # GPU), otherwise as a directory always loads (float32).
        from bts.core.device import model_device
        from bts.core.members import load_causal_lm

        hub_dtype = next(model.hub.parameters()).dtype
        new_expert, _ = load_causal_lm(new_expert, "new expert", hub_dtype if hub_dtype.itemsize == 2 else None,
                                       model_device(model))
    new = _rebuild(model, [*model._expert_models, new_expert], [*names, name])
    n = len(names)
    for old_layer, new_layer in zip(model.stitches, new.stitches):
        if new_layer.kind == E2H:
            new_layer.enable_presence()
            with torch.no_grad():
                new_layer.presence[n + 1].zero_()  # the new member: exactly no mass until trained
        _transfer(old_layer, new_layer, [(i, i) for i in range(n)])
    return new


def remove_expert(model, name: str):
    """A model without expert `name`: its slices are dropped and E→H gates renormalise over the others."""
    r = _expert_index(model, name)
    names = list(model.config.expert_names)
    if len(names) == 1:
        raise BTSError(f"expert '{name}' is the only expert; a stitched model needs at least one.")
    keep = [i for i in range(len(names)) if i != r]
    new = _rebuild(model, [model._expert_models[i] for i in keep], [names[i] for i in keep])
    for old_layer, new_layer in zip(model.stitches, new.stitches):
        if old_layer.presence is not None:
            new_layer.enable_presence()
        _transfer(old_layer, new_layer, list(enumerate(keep)))
    return new


# ---- training after a change: one expert's slots ----------------------------------------------------------
def new_slot_masks(model, name: str) -> dict[str, torch.Tensor]:
    """For each stitch parameter with a slot of expert `name`: a 0/1 mask of that slot (shape of the parameter)."""
    e = _expert_index(model, name)
    masks = {}
    for i, layer in enumerate(model.stitches):
        params = dict(layer.named_parameters())
        for key, (view, offset) in _member_views(layer).items():
            mask = torch.zeros_like(view)
            mask[e + offset] = 1
            masks[f"stitches.{i}.{key}"] = mask.view_as(params[key])
    return masks


__all__ = ["add_expert", "remove_expert", "new_slot_masks"]
