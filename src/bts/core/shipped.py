"""Model shapes shipped with bts (src/bts/configs/<name>/config.json): configs only, no weights, so that recipes
naming real checkpoints can be checked and planned offline (`bts plan qwen2.5-1.5b-code-math`).

    shipped_dir("Qwen/Qwen2.5-Math-1.5B")   # .../configs/qwen2.5-math-1.5b (a hub id or a shipped name)
    member_config("Qwen/Qwen2.5-1.5B", "seed_model.path")   # the cached model's config, else the shipped one

Each config.json holds the values of the checkpoint's published config.json; src/bts/configs/README.md says where
each was read. paper-2.7b is the paper's seed as docs/method.md §4 reconciles it (no released checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from bts.errors import BTSError

SHIPPED_CONFIGS = Path(__file__).parent.parent / "configs"


# Hub id of the published checkpoint -> its shipped shape.
HUB_IDS = {
    "Qwen/Qwen2.5-0.5B": "qwen2.5-0.5b",
    "Qwen/Qwen2.5-1.5B": "qwen2.5-1.5b",
    "Qwen/Qwen2.5-Coder-1.5B": "qwen2.5-coder-1.5b",
    "Qwen/Qwen2.5-Math-1.5B": "qwen2.5-math-1.5b",
    "meta-llama/Llama-3.2-3B": "llama-3.2-3b",
    "HuggingFaceTB/FineMath-Llama-3B": "finemath-llama-3b",
    "google/gemma-2b": "gemma-2b",
    "google/codegemma-2b": "codegemma-2b",
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
}


def shipped_names() -> list[str]:
    return sorted(p.name for p in SHIPPED_CONFIGS.iterdir() if (p / "config.json").is_file())


def shipped_dir(spec: str) -> Path | None:
    """The shipped config's folder for a shipped name or a published hub id; None when bts ships none."""
    name = HUB_IDS.get(spec, spec)
    folder = SHIPPED_CONFIGS / name
    return folder if "/" not in name and (folder / "config.json").is_file() else None


def member_config(spec: str, role: str):
    """(config, where it came from) of a member given by directory or hub id: the model's own config when it is a
    directory or cached, else the shipped config of that hub id. No weights are read."""
    from transformers import AutoConfig

    from bts.core.members import load_config

    try:
        model_dir, config = load_config(spec, role)
        return config, str(model_dir)
    except BTSError:
        folder = shipped_dir(spec)
        if folder is None:
            raise
    return AutoConfig.from_pretrained(folder), f"shipped config {folder.name} (weights not cached)"
