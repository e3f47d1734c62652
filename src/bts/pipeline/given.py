"""Members the user gives rather than the pipeline trains: a seed (`seed_model.path`), experts (`experts.paths`),
or the hub and experts of `bts stitch`.

A given member is used as it is and referenced, never copied: real checkpoints are many gigabytes, so a run
records its resolved folder and weights sha256 (`reference`) and every consumer asks the run for a member's folder
(RunData.model_dir). Before anything is written the members are checked cheaply (`check_members`: configs and
tokenizer files, no weights read), so a wrong path, a foreign tokenizer or an incompatible shape is one sentence.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from bts.core.members import (Member, check_compatible, load_config, resolve_dir, tokenizer_fingerprint,
                              weights_sha256)
from bts.core.stitch import check_stitch_layout
from bts.errors import BTSError


def check_members(hub: tuple[str, str], experts: dict[str, tuple[str, str]]) -> None:
    """hub: (where, spec); experts: name -> (where, spec), `where` naming the key or flag in the error. Each must be
    a model folder (or a hub id in the local cache) with a readable config of a supported family and safetensors
    weights; the hub must ship a tokenizer (the run tokenizes with it); every expert must share the hub's shape and
    tokenizer (bts.core.members.check_compatible, asked of the configs alone)."""
    hub_member = _member("hub", *hub)
    if tokenizer_fingerprint(hub_member.path) is None:
        raise BTSError(f"{hub[0]} '{hub[1]}' has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
                       "the data is tokenized with the hub's tokenizer.")
    members = [_member(name, where, spec) for name, (where, spec) in experts.items()]
    for m, (where, spec) in zip(members, experts.values()):
        try:
            check_compatible(hub_member, [m])
        except BTSError as exc:  # name the key or flag the user wrote, then the reason
            raise BTSError(f"{where} '{spec}': {exc}") from None


def _member(name: str, where: str, spec: str) -> Member:
    model_dir, config = load_config(spec, where)
    if not list(Path(model_dir).glob("*.safetensors")):
        raise BTSError(f"{where} '{spec}' has no .safetensors weights (bts reads safetensors only).")
    return Member(name, SimpleNamespace(config=config), str(model_dir))


def check_recipe_members(recipe, data: bool = True) -> None:
    """The recipe's given seed and experts, and its local data files (every glob matches something, every parquet
    file has the text column), checked before a run writes anything: a typo in the last domain must not cost the
    work on the others, nor bind the run directory to the recipe with the typo."""
    from bts.data.sources import check_files

    for name, spec in recipe.data.domains.items() if data else ():  # data: the data stage is still to run
        if spec.source == "files":
            check_files(name, {"files": spec.files, "text_field": spec.text_field, "group_field": spec.group_field})
    seed = recipe.seed_model.path
    if not seed:
        return  # recipe loading refuses experts.paths without seed_model.path
    check_members(("seed_model.path", seed),
                  {d: (f"experts.paths.{d}", spec) for d, spec in recipe.experts.paths.items()})
    check_layout(recipe.stitch, seed, "seed_model.path")
    check_split(recipe, seed_card(seed))  # a damaged card is refused now, not after the earlier stages ran


def check_split(recipe, card: dict | None) -> None:
    """A seed whose card names the built-in corpora it trained on must be scored on its own held-out groups: the
    same corpora split with the same fractions and split seed (bts.data.documents.split_mask), or the held-out
    text of the run may be text the seed trained on."""
    seen = ((card or {}).get("data") or {})
    corpora = set(seen.get("domains") or ())
    builtin = [d for d, spec in recipe.data.domains.items() if spec.source == "builtin" and d in corpora]
    if not builtin:
        return
    mine = {"data.split_seed": recipe.data.split_seed, "data.split_fractions": list(recipe.data.split_fractions)}
    theirs = {"data.split_seed": seen.get("split_seed", 0), "data.split_fractions": seen.get("split_fractions")}
    for key, value in mine.items():
        if theirs[key] is not None and value != theirs[key]:
            raise BTSError(f"{key}={value} differs from the {theirs[key]} that seed_model.path "
                           f"'{recipe.seed_model.path}' was trained with on the built-in '{builtin[0]}' corpus; "
                           f"keep {key}={theirs[key]}, or the held-out text may be text the seed trained on.")


def check_layout(stitch, hub: str, where: str) -> None:
    """stitch.num_stitches / stitch.positions against a given hub's layer count (its config alone)."""
    layers = load_config(hub, where)[1].num_hidden_layers
    check_stitch_layout(stitch.positions, stitch.num_stitches, layers, f"the {layers} layers of {where} '{hub}'")


def reference(spec: str, where: str) -> dict:
    """What a stage marker records of a given member: its resolved folder and weights hash."""
    model_dir = resolve_dir(spec, where).resolve()
    return {"trained": False, "given": spec, "path": str(model_dir), "sha256": weights_sha256(model_dir)}


CARD = "seed.json"  # a given seed's card, next to its weights: how it was trained (benchmarks/bundle_seed.py)
CARD_INTS = ("tokens", "steps", "batch_size", "seq_len")


def seed_card(spec: str) -> dict | None:
    """The card of a given seed (seed.json in its folder: tokens, steps, batch_size, seq_len, lr, min_lr_ratio,
    recipe, curve), checked; None when the folder has none (a seed from elsewhere)."""
    path = resolve_dir(spec, "seed_model.path") / CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise BTSError(f"seed_model.path '{spec}': {CARD} is not readable JSON.") from None
    bad = [k for k in CARD_INTS if not isinstance(card.get(k) if isinstance(card, dict) else None, int)]
    if bad or not isinstance(card.get("lr"), (int, float)) or not isinstance(card.get("curve", []), list):
        raise BTSError(f"seed_model.path '{spec}': {CARD} needs integer {', '.join(CARD_INTS)}, a number lr and a "
                       f"list curve (got {sorted(card) if isinstance(card, dict) else type(card).__name__}).")
    return card


def seed_reference(spec: str) -> dict:
    """What the seed stage's marker records of a given seed: its reference and its card (copied, so the report
    reads the run directory alone)."""
    card = seed_card(spec)
    return {**reference(spec, "seed_model.path"), **({"card": card} if card is not None else {})}


def check_lora_targets(run) -> None:
    """A given seed's LoRA targets, checked on its config (built on the meta device) before anything is written;
    a scratch seed's were checked when the recipe loaded."""
    r = run.recipe
    if r.experts.lora.r and r.seed_model.path:
        from transformers import AutoConfig

        where = resolve_dir(r.seed_model.path, "seed_model.path")
        try:
            config = AutoConfig.from_pretrained(where)
        except (OSError, ValueError):
            raise BTSError(f"seed_model.path '{r.seed_model.path}' has no readable model config.json.") from None
        from bts.train import lora

        lora.check_targets(config, r.experts.lora.targets)
