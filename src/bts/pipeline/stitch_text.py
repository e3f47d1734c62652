"""The text of `bts stitch`: every --data / --data-hf source streamed into one token shard, in bounded memory.

    readers = open_sources(sources)             # refuses bad globs, files, datasets and columns; reads nothing yet
    print_ = fingerprint(sources)               # path, size, mtime_ns per file; name/config/split (+ cache files)
    shard = build_text(out / "training" / "text.tokens", sources, readers, tok, max_chars=0, max_tokens=0)

The documents go straight from the readers (bts.data.corpora.iter_domain) to bts.data.shards.build_shard, which
writes them under a temporary name and renames the finished shard into place, so a kill leaves nothing that is read
later. `data.max_chars` keeps its meaning (round-robin across groups over all the sources, bts.data.documents
.cap_mask): a first pass keeps each document's group and length only, a second pass reads the sources again and
tokenizes the kept ones. A re-run decides "unchanged" from the fingerprint, never by tokenizing again.
"""

from __future__ import annotations

import os
import re
from array import array

from bts.data.corpora import empty_domain, iter_domain
from bts.data.documents import cap_mask
from bts.data.shards import Shard, build_shard
from bts.data.sources import matched_files
from bts.errors import BTSError

DOMAIN = "stitch"  # the domain name the loaders' messages carry (translated to the flags below)


def _translate(flag: str, exc: BTSError) -> BTSError:
    """The loaders name recipe keys: say the flag and option this command takes instead."""
    text = re.sub(r"data\.domains\.stitch\.(files|dataset)", flag, str(exc))
    return BTSError(text.replace("data.domains.stitch.", "data.").replace("data.domains.stitch", flag))


def open_sources(sources) -> list:
    """One document reader per source; every refusal the loaders make before reading (globs, parquet columns, a
    dataset not in the cache, a missing column) is made here, before anything is written."""
    readers = []
    for flag, spec in sources:
        try:
            readers.append(iter_domain(DOMAIN, spec))
        except BTSError as exc:
            raise _translate(flag, exc) from None
    return readers


def fingerprint(sources) -> list[dict]:
    """What a re-run compares to decide the text is unchanged, without reading it: each matched file's path, size
    and mtime_ns; for a dataset its name, config and split, and the cache files it is read from (when it has
    any: a dataset in memory has no stable fingerprint)."""
    out = []
    for flag, spec in sources:
        if spec["source"] == "files":
            files = [[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns]
                     for f in matched_files(flag, spec["files"])]  # the data stage's own glob rule
            out.append({"files": files})  # the files a pattern matched, not how it was typed
        else:
            out.append({"data_hf": [spec["dataset"], spec["config"], spec["split"]], "files": _hf_files(spec)})
    return out


def _hf_files(spec) -> list | None:
    import datasets

    try:  # from the local cache, memory-mapped: cheap; open_sources has already refused a dataset that fails here
        ds = datasets.load_dataset(spec["dataset"], spec["config"] or None, split=spec["split"])
    except Exception:
        return None
    files = []
    for f in getattr(ds, "cache_files", None) or []:
        name = f.get("filename") if isinstance(f, dict) else None
        if name and os.path.isfile(name):
            st = os.stat(name)
            files.append([name, st.st_size, st.st_mtime_ns])
    return files or None


def same_text(a: list[dict], b: list[dict]) -> bool:
    """Whether two fingerprints name the same text: the same files and datasets in the same order, however the
    command line spelled them (one glob or the files the shell expanded it to)."""
    def flat(prints):
        return [tuple(f) for p in prints if "data_hf" not in p for f in p["files"]] + \
               [(tuple(p["data_hf"]), str(p["files"])) for p in prints if "data_hf" in p]
    return flat(a) == flat(b)


def total_bytes(prints: list[dict]) -> int:
    """The files' sizes: about their characters, for the progress bar's ETA and the choice of worker processes."""
    return sum(size for p in prints for _, size, _ in (p["files"] or []))


def _documents(sources, readers):
    """(text, group) of every document of every source, in the order given; a source with none is refused."""
    for (flag, spec), reader in zip(sources, readers):
        n = 0
        try:
            for d in reader:
                n += 1
                yield d.text, d.group
        except BTSError as exc:  # a bad line deep in a file surfaces while reading
            raise _translate(flag, exc) from None
        if not n:
            raise _translate(flag, empty_domain(DOMAIN, spec))


def _capped(sources, readers, max_chars: int):
    """The documents data.max_chars keeps (round-robin across groups over all the sources), read twice: first
    their groups and lengths only, then the kept texts."""
    group_ids: dict[str, int] = {}
    groups, lengths = array("q"), array("q")
    for text, group in _documents(sources, readers):
        groups.append(group_ids.setdefault(group, len(group_ids)))
        lengths.append(len(text))
    keep = cap_mask(groups, lengths, max_chars)
    del groups, lengths, group_ids
    for k, doc in zip(keep, _documents(sources, open_sources(sources))):
        if k:
            yield doc


def build_text(path, sources, readers, tokenizer, *, seq_len: int, max_chars: int = 0, max_tokens: int = 0,
               total_chars: int = 0) -> Shard:
    """The shard of all the text at `path` (reused as it is when complete); refused when shorter than a sequence."""
    docs = _capped(sources, readers, max_chars) if max_chars else _documents(sources, readers)
    total = min(total_chars, max_chars) if max_chars else total_chars
    shard = build_shard(path, docs, tokenizer, max_tokens=max_tokens, total_chars=total, desc="tokenize",
                        fault="shard:stitch")
    if len(shard) <= seq_len + 1:
        raise BTSError(f"the text of --data / --data-hf is {len(shard)} tokens, fewer than one sequence of "
                       f"data.seq_len={seq_len}.")
    return shard
