"""Documents and their splits: `Document(id, group, text)`, group splits, round-robin caps, committed fixtures.

A *group* is the unit that never straddles two splits (a novel, a top-level stdlib package, a set.mm chapter, a
license family), so held-out text is never a near-copy of training text. The fixtures are small committed slices
of the built-in domains under bts/data/fixtures/<domain>/ (tests, the smoke preset), written by
`bts data --write-fixtures`. The entry point is bts.data.corpora.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bts.atomic import atomic_write_json, atomic_write_text
from bts.errors import BTSError

BUILTIN_DOMAINS = ("code", "prose", "math", "legal")  # obtained by bts.data.builtin; each has a fixture
SPLITS = ("train", "val", "heldout")


@dataclass(frozen=True)
class Document:
    id: str
    group: str
    text: str


def split_by_group(docs: list[Document], fractions=(0.8, 0.1, 0.1), seed: int = 0,
                   heldout_groups=None, max_chars: int = 0) -> dict[str, list[Document]]:
    """Assign whole groups to train / val / heldout, aiming at `fractions` of the characters (assign_groups), then
    cap each split at its fraction of `max_chars` (split_mask: the split never depends on the cap)."""
    where = split_mask([d.group for d in docs], [len(d.text) for d in docs], max_chars, fractions, seed,
                       heldout_groups)
    out = {s: [] for s in SPLITS}
    for d, split in zip(docs, where):
        if split:
            out[split].append(d)
    return out


def split_mask(groups, lengths, max_chars: int, fractions=(0.8, 0.1, 0.1), seed: int = 0,
               heldout_groups=None) -> list[str | None]:
    """The split of each document (given by group and length, in order), or None where the cap drops it.

    Groups are assigned on the whole corpus first and each split is then capped at its fraction of `max_chars`
    (round-robin across its groups, cap_mask). So a group's split never depends on the cap: a recipe that reads a
    corpus in full (the bundled seed's) never trains on a group that a capped recipe of the same corpus (the demo)
    holds out.
    """
    sizes: dict = {}
    for g, n in zip(groups, lengths):
        sizes[g] = sizes.get(g, 0) + n
    assign = assign_groups(sizes, fractions, seed, heldout_groups)
    where = [assign[g] for g in groups]
    if not max_chars:
        return where
    fraction = dict(zip(SPLITS, (float(f) for f in fractions)))
    for split in SPLITS:
        idx = [i for i, w in enumerate(where) if w == split]
        keep = cap_mask([groups[i] for i in idx], [lengths[i] for i in idx], max(1, int(fraction[split] * max_chars)))
        for i, k in zip(idx, keep):
            if not k:
                where[i] = None
    return where


def assign_groups(sizes: dict[str, int], fractions=(0.8, 0.1, 0.1), seed: int = 0,
                  heldout_groups=None) -> dict[str, str]:
    """group -> split from the groups' sizes in characters alone (so a corpus never has to be in memory).

    Deterministic in (groups, sizes, seed). Every split with a non-zero fraction gets at least one group, and no
    group is in two splits. With `heldout_groups`, exactly those groups are held out and the heldout fraction is
    ignored. The small splits are filled first (heldout, then val) from a seeded shuffle, taking groups that fit
    in the target, or the smallest group if none fits; train gets the rest.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise BTSError(f"data.split_fractions must be three non-negative numbers (train > 0) summing to 1 "
                       f"(got {list(fractions)}).")
    total = sum(sizes.values())
    order = sorted(sizes)
    random.Random(f"bts-split-{seed}").shuffle(order)  # str seeds are hashed deterministically (not PYTHONHASHSEED)
    assign: dict[str, str] = {}
    to_fill = [("val", fractions[1])]
    if heldout_groups is not None:
        for g in heldout_groups:
            if g not in sizes:
                known = ", ".join(sorted(sizes)[:8]) + (", ..." if len(sizes) > 8 else "")
                raise BTSError(f"heldout_groups names '{g}', which is not a document group (groups: {known}).")
            assign[g] = "heldout"
    else:
        to_fill.insert(0, ("heldout", fractions[2]))
    needed = 1 + sum(1 for _, f in to_fill if f > 0) + (heldout_groups is not None and bool(heldout_groups))
    if len(sizes) < needed:
        shown = ", ".join(order[:8]) + (", ..." if len(order) > 8 else "")
        raise BTSError(f"a domain's documents come from {len(sizes)} group(s) ({shown}) but the train / val / "
                       f"held-out split by group needs at least {needed}, one per non-empty split; add documents "
                       "from more groups (for txt files: more files; or set group_field).")
    for split, fraction in to_fill:
        if fraction <= 0:
            continue
        target, taken = fraction * total, 0
        free = [g for g in order if g not in assign]
        reserve = 1 + (split == "heldout" and fractions[1] > 0)  # groups the later splits still need
        chosen = []
        for g in free:
            if len(free) - len(chosen) <= reserve:
                break
            if taken + sizes[g] <= target:
                chosen.append(g)
                taken += sizes[g]
        if not chosen:
            chosen = [min(free, key=lambda g: sizes[g])]
        for g in chosen:
            assign[g] = split
    return {g: assign.get(g, "train") for g in sizes}


def cap_documents(docs: list[Document], max_chars: int | None) -> list[Document]:
    """At most `max_chars` characters, taken round-robin across groups (cap_mask); output keeps the input order."""
    keep = cap_mask([d.group for d in docs], [len(d.text) for d in docs], max_chars)
    return [d for d, k in zip(docs, keep) if k]


def cap_mask(groups, lengths, max_chars: int | None) -> list[bool]:
    """Which documents (given by group and length, in order) to keep for at most `max_chars` characters, taken
    round-robin across groups (document order within a group).

    A document that would overflow the cap closes its group, so the result never exceeds the cap and small groups
    are not starved by big ones. None or 0 means no cap.
    """
    if not max_chars or sum(lengths) <= max_chars:
        return [True] * len(lengths)
    queues: dict = {}
    for i, g in enumerate(groups):
        queues.setdefault(g, collections.deque()).append(i)
    keep, used = [False] * len(lengths), 0
    while queues:
        for group in list(queues):
            i = queues[group].popleft()
            if used + lengths[i] > max_chars:
                queues[group].clear()
            else:
                keep[i] = True
                used += lengths[i]
            if not queues[group]:
                del queues[group]
    return keep


def fixture_slice(docs: list[Document], max_chars: int = 90_000, doc_chars: int = 4_000,
                  max_groups: int = 10, seed: int = 0) -> list[Document]:
    """A small committed-fixture slice: up to `max_groups` groups (seeded pick), documents cut at a line break."""
    groups = sorted({d.group for d in docs})
    random.Random(f"bts-fixture-{seed}").shuffle(groups)
    picked = set(groups[:max_groups])
    cut = [Document(d.id, d.group, _cut_at_line(d.text, doc_chars)) for d in docs if d.group in picked]
    return cap_documents([d for d in cut if d.text.strip()], max_chars)


def write_fixture(domain: str, docs: list[Document], out_dir, source_prov: dict) -> None:
    """Write `docs` as the committed fixture of `domain` with a provenance/license note."""
    out = Path(out_dir) / domain
    atomic_write_text(out / "documents.jsonl", "".join(
        json.dumps(dataclasses.asdict(d), ensure_ascii=False) + "\n" for d in docs))
    keep = ("source", "version", "command", "license", "url")
    atomic_write_json(out / "provenance.json", {
        **{k: source_prov[k] for k in keep if k in source_prov}, "domain": domain,
        "documents": len(docs), "groups": len({d.group for d in docs}), "chars": sum(len(d.text) for d in docs),
        "note": "A small slice (documents truncated at a line break) of the built-in domain, written by "
                "`bts data --write-fixtures`; used by tests and the smoke preset.",
    })


# ---- fixtures and document files ----------------------------------------------------------------------
def fixture_corpus(domain: str) -> list[Document]:
    """The small committed slice of a built-in domain (no downloads)."""
    if domain not in BUILTIN_DOMAINS:
        raise BTSError(f"data.domains.{domain}.source is 'fixture' but fixtures exist only for "
                       f"{', '.join(BUILTIN_DOMAINS)}.")
    return _read_jsonl_docs(_fixture_dir(domain) / "documents.jsonl")


def _fixture_dir(domain: str) -> Path:
    return Path(str(resources.files("bts.data") / "fixtures" / domain))


def fixture_provenance(domain: str) -> dict:
    """Provenance and license note of the committed fixture of a built-in domain."""
    return json.loads((_fixture_dir(domain) / "provenance.json").read_text(encoding="utf-8"))


def _read_jsonl_docs(path: Path) -> list[Document]:
    return list(_iter_jsonl_docs(path))


def _iter_jsonl_docs(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield Document(**json.loads(line))


def _cut_at_line(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[:limit]
    return head[:head.rfind("\n") + 1] if "\n" in head else head
