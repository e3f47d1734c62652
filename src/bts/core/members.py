"""Loading, fingerprinting and checking the members (hub and experts) of a stitched model.

Members are ordinary Hugging Face causal LMs given as a local directory, a hub id (resolved from the local cache
only when offline) or an already loaded model. Before anything is built or written, every member is checked
against the hub: same model_type, hidden size, layer count, vocabulary and tokenizer. A mismatch is a one-sentence
`BTSError` naming the field and both values.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bts.core import hf
from bts.errors import BTSError

CHECKED_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass
class Member:
    name: str
    model: nn.Module  # a *ForCausalLM
    path: str | None  # where it was loaded from (None: given in memory)


def resolve_dir(spec: str, role: str) -> Path:
    """A local directory for `spec` (a path, or a hub id already in the local cache)."""
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


def load_causal_lm(spec, role: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, str | None]:
    """Load one member; returns (model, directory or None for an in-memory model)."""
    if isinstance(spec, nn.Module):
        if hasattr(spec, "config"):  # an unsupported family (e.g. GPT-2) is named as such, not as a non-causal LM
            hf.check_supported(spec.config)
        if not hasattr(spec, "model") or not hasattr(spec, "lm_head"):
            raise BTSError(f"{role} must be a *ForCausalLM model (got {type(spec).__name__}).")
        if dtype is not None:  # as from a directory: the model is cast (in place, as nn.Module.to does)
            spec.to(dtype)
        return spec, getattr(spec, "_bts_source_dir", None)
    from transformers import AutoModelForCausalLM

    model_dir, _ = load_config(spec, role)
    weights_sha256(model_dir)  # refuses pickled-only checkpoints before anything loads
    check_safetensors(model_dir, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32, use_safetensors=True)
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


def check_compatible(hub: Member, experts: list[Member]) -> None:
    if not experts:
        raise BTSError("experts: at least one expert is needed (n = 0 given).")
    names = [hub.name] + [e.name for e in experts]
    if len(set(names)) != len(names):
        raise BTSError(f"member names must be unique (got {names}).")
    hub_tok = tokenizer_fingerprint(hub.path)
    for e in experts:
        for field in CHECKED_FIELDS:
            a, b = getattr(hub.model.config, field, None), getattr(e.model.config, field, None)
            if a != b:
                raise BTSError(f"expert '{e.name}' has {field}={b} but the hub has {field}={a}; "
                               "all members must share one architecture.")
        tok = tokenizer_fingerprint(e.path)
        if hub_tok is not None and tok is not None and tok != hub_tok:
            raise BTSError(f"expert '{e.name}' has a different tokenizer from the hub ('{e.path}' vs '{hub.path}'); "
                           "all members must share one tokenizer.")


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.eval()
    return model
