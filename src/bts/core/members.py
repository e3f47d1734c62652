"""Loading, fingerprinting and checking the members (hub and experts) of a stitched model.

Members are ordinary Hugging Face causal LMs given as a local directory, a hub id (resolved from the local cache
only when offline) or an already loaded model. Before anything is built or written, every member is checked
against the hub for what the stitch needs (check_compatible): same model_type, hidden size, layer count and token
ids. A mismatch is a one-sentence `BTSError` naming the member, the field and both values.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bts.core import hf
from bts.core.device import load_kwargs
from bts.core.bundled import BUNDLED, bundled_seed
from bts.errors import BTSError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")  # what fingerprints a tokenizer
# Written with a model so that it reads and writes its members' tokens: the above and their side files.
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                        "chat_template.json")


@dataclass
class Member:
    name: str
    model: nn.Module  # a *ForCausalLM
    path: str | None  # where it was loaded from (None: given in memory)


def resolve_dir(spec: str, role: str) -> Path:
    """A local directory for `spec` (a path, `bundled:NAME` for a seed shipped with bts, or a hub id already in the
    local cache)."""
    if spec.startswith(BUNDLED):  # a seed shipped with bts (bts.core.bundled)
        return bundled_seed(spec[len(BUNDLED):], role)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not HUB_ID.fullmatch(spec):
        raise BTSError(f"{role} path '{spec}' is not a model directory (it does not exist or is not a folder).")
    try:  # a hub id: only what is already cached locally, so nothing is downloaded behind the user's back
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:
        raise BTSError(f"{role} '{spec}' is neither a local model directory nor a hub id in the local cache.") from None


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """A content hash of a model directory's weight files (safetensors, in name order)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise BTSError(f"model directory '{model_dir}' has no .safetensors weights (bts reads safetensors only).")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_config(spec, role: str):
    """(directory, config) of a member given by path or cached hub id, its architecture checked; no weights read."""
    from transformers import AutoConfig

    model_dir = resolve_dir(str(spec), role)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise BTSError(f"{role} '{spec}' has no readable config.json ({type(exc).__name__}).") from None
    hf.check_supported(config)
    return model_dir, config


def load_causal_lm(spec, role: str, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> tuple[nn.Module, str | None]:
    """Load one member; returns (model, directory or None for an in-memory model). `device`: where its weights go,
    read from disk straight onto it (None: the CPU, as Hugging Face loads)."""
    if isinstance(spec, nn.Module):
        if hasattr(spec, "config"):  # an unsupported family (e.g. GPT-2) is named as such, not as a non-causal LM
            hf.check_supported(spec.config)
        if not hasattr(spec, "model") or not hasattr(spec, "lm_head"):
            raise BTSError(f"{role} must be a *ForCausalLM model (got {type(spec).__name__}).")
        if dtype is not None:  # as from a directory: the model is cast (in place, as nn.Module.to does)
            spec.to(dtype)
        if device is not None:
            spec.to(device)
        return spec, getattr(spec, "_bts_source_dir", None)
    from transformers import AutoModelForCausalLM

    model_dir, _ = load_config(spec, role)
    weights_sha256(model_dir)  # refuses pickled-only checkpoints before anything loads
    check_safetensors(model_dir, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32, use_safetensors=True,
                                                     **load_kwargs(device))
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200].rstrip(".")
        raise BTSError(f"{role} '{spec}' could not be loaded ({reason}).") from None
    # Recorded absolute: a saved stitched model must find its members from wherever it is loaded.
    model._bts_source_dir = str(model_dir.resolve())
    return model, model._bts_source_dir


def check_safetensors(model_dir, role: str) -> None:
    """Read every weight file's header (cheap): a truncated or corrupt file is named before anything loads."""
    from safetensors import safe_open

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(f, "pt") as fh:
                for key in fh.keys():
                    fh.get_slice(key)
        except Exception as exc:  # noqa: BLE001 - the library raises its own error types
            reason = str(exc).splitlines()[0][:160].rstrip(".")
            raise BTSError(f"{role} weights file '{f}' is corrupt or truncated ({reason}).") from None


def tokenizer_fingerprint(model_dir: str | None) -> str | None:
    if model_dir is None:
        return None
    digest, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        f = Path(model_dir) / name
        if f.exists():
            digest.update(name.encode() + f.read_bytes())
            found = True
    return digest.hexdigest() if found else None


def tokenizer_vocab(model_dir: str | None) -> dict | None:
    """A member's token → id map, read from its tokenizer.json or vocab.json (None: neither is readable)."""
    if model_dir is None:
        return None
    folder = Path(model_dir)
    try:
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
        if (folder / "vocab.json").is_file():
            import json

            return json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is treated as unknown
        return None
    return None


# What the stitch needs of every member, with why (the end of the one-line refusal).
STITCH_NEEDS = {
    "model_type": "all members must share one architecture",
    "hidden_size": "the stitch layers mix residual streams of one width",
    "num_hidden_layers": "the stitch placement needs equal layer counts",
}


def check_compatible(hub: Member, experts: list[Member]) -> None:
    """Members must be able to share residual streams (one architecture, hidden size and layer count) and token ids:
    the same tokenizer files, or the same vocabulary with extra padding rows (more embedding rows than tokens; the
    stitched model never produces a padding row, bts.core.model). Rotary θ and scaling, context, attention settings
    and dtype may differ: every member runs as itself. Anything else is refused in one line naming the member, the
    field and both values."""
    if not experts:
        raise BTSError("experts: at least one expert is needed (n = 0 given).")
    names = [hub.name] + [e.name for e in experts]
    if len(set(names)) != len(names):
        raise BTSError(f"member names must be unique (got {names}).")
    hub_tok = tokenizer_fingerprint(hub.path)
    for e in experts:
        for field, why in STITCH_NEEDS.items():
            a, b = getattr(hub.model.config, field, None), getattr(e.model.config, field, None)
            if a != b:
                raise BTSError(f"expert '{e.name}' has {field}={b} but the hub has {field}={a}; {why}.")
        tok = tokenizer_fingerprint(e.path)
        same_files = hub_tok is not None and tok == hub_tok
        if hub_tok is not None and tok is not None and not same_files:
            vocab = tokenizer_vocab(e.path)
            if vocab is None or vocab != tokenizer_vocab(hub.path):
                raise BTSError(f"expert '{e.name}' has a different tokenizer from the hub ('{e.path}' vs "
                               f"'{hub.path}'); all members must share one tokenizer.")
            same_files = True  # the same vocabulary, other files (e.g. a different chat template)
        a, b = hub.model.config.vocab_size, e.model.config.vocab_size
        if a != b:
            tokens = len(tokenizer_vocab(hub.path) or {}) if same_files else 0
            if not same_files or not tokens or tokens > min(a, b):
                raise BTSError(f"expert '{e.name}' has vocab_size={b} but the hub has vocab_size={a}; members "
                               "need the same token ids (a different vocab_size is accepted only as padding rows "
                               "beyond one shared tokenizer's vocabulary).")


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.eval()
    return model


# ---- several members: loading, the manifest a saved model keeps, reloading ---------------------------------------
def load_member_set(members, names: list | None = None, dtype: torch.dtype | None = None, *,
                    hub_role: str = "seed", device: torch.device | str | None = None) -> list[Member]:
    """Load and check the members, hub (seed) first, then experts: dirs, cached hub ids or loaded *ForCausalLM
    models. `names`: one per member, None for the default (the hub: `hub_role`; an expert: its folder's name, or
    expert<i> for a model given in memory). Errors name them by role ("hub" / "seed", "expert <i>")."""
    members = list(members) if isinstance(members, (list, tuple)) else [members]
    if not members:
        raise BTSError("members: at least one member (the seed) is needed (got none).")
    if names is not None and len(names) != len(members):
        raise BTSError(f"names: {len(names)} names given for {len(members)} members.")
    loaded = []
    for i, spec in enumerate(members):
        model, path = load_causal_lm(spec, hub_role if i == 0 else f"expert {i}", dtype, device)
        default = hub_role if i == 0 else f"expert{i}" if isinstance(spec, nn.Module) else Path(str(spec)).name
        loaded.append(Member(names[i] if names and names[i] is not None else default, model, path))
    if len(loaded) > 1:
        check_compatible(loaded[0], loaded[1:])
    return loaded


def member_manifest(members: list[Member]) -> list[dict]:
    """What a composite model's config records of each member: name, where it was loaded from, weights hash."""
    return [{"name": m.name, "path": m.path, "sha256": weights_sha256(m.path) if m.path else None} for m in members]


def save_member_manifest(manifest: list[dict], models: list[nn.Module], out: Path, export_members: bool) -> list:
    """The manifest to write into `out`. Members that only exist in memory (or all, with export_members) are
    written under out/members/<name> and referenced relatively, so the folder is self-contained; a member that
    already lies inside `out` is referenced relatively too, so the folder stays relocatable. An export is checked
    before anything is written: it must carry the weights the model was built against."""
    if export_members:
        for spec in manifest:
            if spec["path"] and (not Path(spec["path"]).is_dir()
                                 or (spec.get("sha256") and weights_sha256(spec["path"]) != spec["sha256"])):
                raise BTSError(f"member '{spec['name']}' at '{spec['path']}' is missing or has changed since it "
                               "was loaded, so it cannot be exported.")
    written = []
    for spec, model in zip(manifest, models):
        spec = dict(spec)
        if export_members or not spec["path"]:
            target = out / "members" / spec["name"]
            if spec["path"] and Path(spec["path"]).resolve() != target.resolve():
                copy_model_dir(Path(spec["path"]), target)
            elif not spec["path"]:
                model.save_pretrained(target)
            spec["path"] = f"members/{spec['name']}"
            spec["sha256"] = weights_sha256(target)
        elif Path(spec["path"]).resolve().is_relative_to(out.resolve()):
            spec["path"] = Path(spec["path"]).resolve().relative_to(out.resolve()).as_posix()
        written.append(spec)
    return written


def reload_members(config, folder: Path, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> list[nn.Module]:
    """Load the members a saved model's config lists (paths relative to `folder` or absolute), refusing any whose
    weights changed since it was saved. config.members then records where each member really is (absolute), so a
    later save elsewhere does not point at a relative path."""
    models, resolved = [], []
    for spec in config.members:
        path = Path(spec["path"])
        path = path if path.is_absolute() else folder / path
        resolved.append({**spec, "path": str(path.resolve())})
        if not path.is_dir():
            raise BTSError(f"member '{spec['name']}' was saved from '{path}', which no longer exists (put it back, "
                           "or edit members[].path in the model's config.json; `bts build --export` or `bts stitch "
                           "--export` writes a folder that carries its members).")
        found = weights_sha256(path)
        if spec.get("sha256") and found != spec["sha256"]:
            raise BTSError(f"member '{spec['name']}' at '{path}' has changed since the model was saved "
                           f"(weights sha256 {found[:12]}… != recorded {spec['sha256'][:12]}…).")
        models.append(load_causal_lm(str(path), f"member '{spec['name']}'", dtype, device)[0])
    config.members = resolved
    return models


def copy_model_dir(src: Path, dst: Path) -> None:
    """Copy a model folder's files (not its subfolders) into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def copy_tokenizer(src_dir, out: Path) -> None:
    """Ship a member's tokenizer files with a model written to `out` (files already in `out` are kept)."""
    if not src_dir or Path(src_dir).resolve() == Path(out).resolve():
        return
    for name in (*TOKENIZER_FILES, *TOKENIZER_SIDE_FILES):
        src = Path(src_dir) / name
        if src.is_file() and not (Path(out) / name).exists():
            shutil.copy2(src, Path(out) / name)
