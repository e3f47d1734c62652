"""A domain's documents streamed to disk and split by group, in bounded memory: the pipeline's data stage.

    info = prepare_domain("code", spec, "runs/x/data/code", fractions=(0.8, 0.1, 0.1), seed=0)

Two passes, neither holding the corpus: the first streams the documents (bts.data.corpora.iter_domain) into a spool
file, keeping only each document's group and length; the group split, then the `max_chars` cap of
each split (round-robin across its groups), are computed from those numbers (bts.data.documents.split_mask, the
same rules as for a list);
the second pass copies each kept document from the spool into {train,val,heldout}.jsonl. Everything is written in a
temporary folder next to `out_dir` and renamed into place at the end, so a bad line in the tenth file, or a kill,
leaves no half-written domain behind. Memory: a few numbers per document and a name per group.
"""

from __future__ import annotations

import json
import os
import shutil
from array import array
from pathlib import Path

from bts.data import corpora
from bts.data.documents import SPLITS, split_mask
from bts.data.shards import remove_stale
from bts.errors import BTSError


def prepare_domain(name: str, spec, out_dir, fractions=(0.8, 0.1, 0.1), seed: int = 0, cache_dir=None) -> dict:
    """Write out_dir/{train,val,heldout}.jsonl (lines {"id", "group", "text"}); what was written, per split, and
    the counts the provenance needs (documents, chars, replaced_bytes)."""
    out = Path(out_dir)
    stats: dict = {}
    docs = corpora.iter_domain(name, spec, cache_dir, stats)  # refuses bad specs / globs before anything is made
    s = corpora._normalise_spec(name, spec)
    remove_stale(out)  # left by a killed run
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        group_ids: dict[str, int] = {}
        doc_group, doc_len = array("q"), array("q")
        with open(tmp / "spool.jsonl", "w", encoding="utf-8") as spool:
            for d in docs:
                doc_group.append(group_ids.setdefault(d.group, len(group_ids)))
                doc_len.append(len(d.text))
                spool.write(json.dumps({"id": d.id, "group": d.group, "text": d.text}, ensure_ascii=False) + "\n")
        if not doc_len:
            raise corpora.empty_domain(name, spec)
        names = list(group_ids)
        where = split_mask([names[g] for g in doc_group], doc_len, s["max_chars"], fractions, seed)
        counts = {split: {"documents": 0, "chars": 0} for split in SPLITS}
        files = {split: open(tmp / f"{split}.jsonl", "w", encoding="utf-8") for split in SPLITS}
        try:
            with open(tmp / "spool.jsonl", encoding="utf-8") as spool:
                for line, n, split in zip(spool, doc_len, where):
                    if split:
                        files[split].write(line)
                        counts[split]["documents"] += 1
                        counts[split]["chars"] += n
        finally:
            for f in files.values():
                f.close()
        (tmp / "spool.jsonl").unlink()
        if out.exists():
            shutil.rmtree(out)  # an earlier, interrupted data stage (its shards go with it)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"splits": counts, "documents": sum(c["documents"] for c in counts.values()),
            "chars": sum(c["chars"] for c in counts.values()),
            "groups": len({g for g, split in zip(doc_group, where) if split}),
            "replaced_bytes": stats.get("replaced_bytes", 0), "replaced_in": stats.get("replaced_in", [])[:10]}


def read_split(path) -> "iter":
    """(text, group) of every document of a split file, in order, one line at a time."""
    path = Path(path)
    if not path.exists():
        raise BTSError(f"{path} does not exist; run the data stage first.")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                yield row["text"], row["group"]
