"""Pretrained seeds shipped with bts, weights and all: src/bts/seeds/<name> (an HF folder plus seed.json, the card
with the recipe that trained it, its budget, validation curve and every file's sha256), named `bundled:<name>`
wherever a model folder is expected (seed_model.path: bundled:demo). benchmarks/bundle_seed.py writes them."""

from __future__ import annotations

from pathlib import Path

from bts.errors import BTSError

BUNDLED = "bundled:"
BUNDLED_SEEDS = Path(__file__).parent.parent / "seeds"


def bundled_names() -> list[str]:
    if not BUNDLED_SEEDS.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_SEEDS.iterdir() if (p / "seed.json").is_file())


def bundled_seed(name: str, role: str = "seed_model.path") -> Path:
    """The folder of the seed shipped as `bundled:<name>` (weights, tokenizer, seed.json)."""
    folder = BUNDLED_SEEDS / name
    if "/" in name or not (folder / "seed.json").is_file():
        known = ", ".join(f"{BUNDLED}{n}" for n in bundled_names()) or "none"
        raise BTSError(f"{role} '{BUNDLED}{name}' names no seed shipped with bts (shipped: {known}).")
    return folder
