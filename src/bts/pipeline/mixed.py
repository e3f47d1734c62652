"""The run's natural mixed-document held-out sets (bts.data.mixed, docs/mixed.md): written once under data/mixed/,
document-disjoint from the run's training text, tokenized with the run's tokenizer and scored by the evaluate stage
next to the pure domains (results.json `mixed_docs`, each method's `mixed_docs_loss`); one document's per-token
gates go to eval/gates.json `mixed_docs_heatmap`.

Disjointness: a mixed document is dropped when its whitespace-normalised text equals a training or validation
document of any domain, or when half or more of its long lines (≥ 40 characters, stripped) occur verbatim there.
The sets' provenance (data/mixed/provenance.json) records what was dropped and the share of long lines shared.
"""

from __future__ import annotations

import bisect
import hashlib
import json

import torch

from bts.atomic import atomic_write_json, atomic_write_text
from bts.data.mixed import MIXED_SETS, load_mixed, python_segments
from bts.data.prepare import read_split
from bts.data.streams import eval_windows
from bts.errors import BTSError
from bts.pipeline.rundir import log

LONG_LINE = 40


def mixed_source(recipe) -> str:
    """builtin | fixture | off: data.mixed_docs, with auto resolved from the domains' sources."""
    chosen = recipe.data.mixed_docs
    if chosen != "auto":
        return chosen
    sources = {getattr(spec, "source", "builtin") for spec in recipe.data.domains.values()}
    return "fixture" if sources == {"fixture"} else "builtin" if "builtin" in sources else "off"


def _digest(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def _long_lines(text: str) -> set[str]:
    return {s for s in (line.strip() for line in text.splitlines()) if len(s) >= LONG_LINE}


def training_fingerprints(run) -> tuple[set[str], set[str]]:
    """(document digests, long lines) of every domain's train and val splits."""
    digests, lines = set(), set()
    for d in run.domains:
        for split in ("train", "val"):
            for text, _ in read_split(run.path("data", d, f"{split}.jsonl")):
                digests.add(_digest(text))
                lines |= _long_lines(text)
    return digests, lines


def disjoint(docs, digests: set[str], lines: set[str]) -> tuple[list, dict]:
    """The documents that are not copies of training text, and what was measured: dropped ids, the share of
    long lines the kept documents share with training."""
    kept, dropped, shared, total = [], [], 0, 0
    for d in docs:
        own = _long_lines(d.text)
        common = len(own & lines)
        if _digest(d.text) in digests or (own and 2 * common >= len(own)):
            dropped.append(d.id)
            continue
        kept.append(d)
        shared, total = shared + common, total + len(own)
    return kept, {"dropped": dropped, "shared_long_lines": round(shared / total, 4) if total else 0.0}


def prepare_mixed_docs(run) -> dict:
    """data/mixed/<set>.jsonl and data/mixed/provenance.json, written once; the provenance ({set: info}, with
    "missing": the one-sentence reason for a set that could not be obtained)."""
    source = mixed_source(run.recipe)
    folder = run.path("data", "mixed")
    prov_file = folder / "provenance.json"
    if source == "off":
        return {}
    if prov_file.exists():
        prov = json.loads(prov_file.read_text(encoding="utf-8"))
        if all(prov.get(s, {}).get("from") == source and "missing" not in prov[s] for s in MIXED_SETS):
            return prov  # complete; a set that could not be fetched is tried again
    digests, lines = training_fingerprints(run)
    prov = {}
    for name in MIXED_SETS:
        try:
            docs, info = load_mixed(name, source)
        except BTSError as exc:
            log(f"warning: {exc}")
            prov[name] = {"from": source, "missing": str(exc)}
            continue
        kept, measured = disjoint(docs, digests, lines)
        atomic_write_text(folder / f"{name}.jsonl", "".join(
            json.dumps({"id": d.id, "group": d.group, "text": d.text}, ensure_ascii=False) + "\n" for d in kept))
        keep = ("source", "version", "command", "license")
        prov[name] = {**{k: info[k] for k in keep if k in info}, "from": source, "documents": len(kept), **measured}
    atomic_write_json(prov_file, prov)  # last: the sets are complete
    return prov


def _docs(run, name: str) -> list[dict]:
    with open(run.path("data", "mixed", f"{name}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mixed_windows(run) -> dict[str, torch.Tensor]:
    """{set: eval windows [N, seq_len]}: each set's documents in order, tokenized and EOS-separated like the
    shards, at most data.eval_tokens tokens (so the evaluate stage grows by seconds)."""
    prov = prepare_mixed_docs(run)
    tok, seq, budget = run.tokenizer(), run.recipe.data.seq_len, run.recipe.data.eval_tokens
    out = {}
    for name, info in prov.items():
        if "missing" in info:
            continue
        ids: list[int] = []
        for row in _docs(run, name):
            ids += tok(row["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if budget and len(ids) >= budget:
                break
        if len(ids) >= seq:
            out[name] = eval_windows(torch.tensor(ids, dtype=torch.long), seq, budget)
    return out


def describe(run, windows: dict[str, torch.Tensor]) -> dict:
    """results.json `mixed_docs`: per scored set its source, license, documents and tokens scored."""
    prov = prepare_mixed_docs(run)
    return {name: {**{k: prov[name][k] for k in ("source", "version", "license", "documents", "dropped",
                                                 "shared_long_lines") if k in prov[name]},
                   "tokens_scored": int(w.numel())} for name, w in windows.items()}


def heatmap_document(run, name: str = "code_doc") -> tuple[torch.Tensor, list[tuple[int, str]], str] | None:
    """One natural mixed document for the gate heatmap: the window of 2·seq_len tokens (starts every seq_len/2,
    over the code_doc set's documents) showing the most kinds (license / comment / docstring / code), the most
    evenly; with [(token start, kind)] where the kind changes. None when the set is not there."""
    prov = prepare_mixed_docs(run)
    if name not in prov or "missing" in prov[name]:
        return None
    tok, length = run.tokenizer(), 2 * run.recipe.data.seq_len
    best = None
    for row in _docs(run, name):
        enc = tok(row["text"], add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if len(ids) < length:
            continue
        segs = python_segments(row["text"])
        starts = [a for a, _ in segs]
        kinds = [_kind_at(starts, segs, a) for a, _ in offsets]
        for start in range(0, len(ids) - length + 1, length // 4):
            window = kinds[start:start + length]
            score = (len(set(window)), -max(window.count(k) for k in set(window)))  # most kinds, most even
            if best is None or score > best[0]:
                bounds = [(i, k) for i, k in enumerate(window) if i == 0 or window[i - 1] != k]
                best = (score, torch.tensor(ids[start:start + length]), bounds, f"{row['id']} tokens {start}–"
                        f"{start + length}")
    return None if best is None else best[1:]


def _kind_at(starts: list[int], segs: list[tuple[int, str]], char: int) -> str:
    return segs[max(0, bisect.bisect_right(starts, char) - 1)][1]


GATE_WINDOWS = 4  # windows per set for its mean gates: a few forward passes of the stitched model


def set_gates(run, model) -> dict:
    """eval/gates.json `mixed_docs_gates`: per natural mixed-document set, the mean mixing weight per member at
    each E→H stitch over the tokens of its first GATE_WINDOWS scored windows (bts.eval.gates.gate_table)."""
    from bts.eval.gates import gate_table

    return gate_table(model, {name: w[:GATE_WINDOWS] for name, w in mixed_windows(run).items()})


def gates_stale(run, path) -> bool:
    """Whether an existing eval/gates.json lacks the mixed-document sets' gates the recipe now scores."""
    return mixed_source(run.recipe) != "off" and "mixed_docs_gates" not in json.loads(path.read_text())
