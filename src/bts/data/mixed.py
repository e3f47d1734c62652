"""Natural mixed-domain held-out sets: documents in which domains mix inside the document, from packages that no
built-in domain trains on (the evaluate stage scores them next to the pure domains, docs/mixed.md).

| set        | source (PyPI, pinned)              | mixes                                        | license      |
|------------|------------------------------------|----------------------------------------------|--------------|
| code_doc   | absl-py 2.1.0 wheel, absl/**/*.py  | code, docstrings, comments, license headers  | Apache-2.0   |
| prose_code | click 8.1.7 sdist, docs/*.rst      | prose quoting code and shell sessions        | BSD-3-Clause |
| math_prose | mpmath 1.3.0, function_docs.py     | LaTeX mathematics in prose, with doctests   | BSD-3-Clause |

Fetched once like the built-in corpora (bts.data.builtin: a temp dir, cached under <corpora cache>/mixed-<set>/,
documents.jsonl then provenance.json, atomically); `source="fixture"` reads the small committed slices under
bts/data/fixtures/mixed/ (tests, the smoke preset) and touches no network.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import re
import sys
import tarfile
import tempfile
import tokenize
import zipfile
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from bts.atomic import atomic_write_json, atomic_write_text
from bts.data.builtin import _SourceError, _one, _read_provenance, _run, default_cache_dir
from bts.data.documents import Document
from bts.errors import BTSError

MIXED_SETS = ("code_doc", "prose_code", "math_prose")
MIXED_FORMAT = 1  # bump when the extraction changes, so old caches are rebuilt


def load_mixed(name: str, source: str = "builtin", cache_dir=None) -> tuple[list[Document], dict]:
    """The documents and provenance of mixed set `name`, from the registry (cached) or the committed fixture."""
    if name not in MIXED_SETS:
        raise BTSError(f"'{name}' is not a mixed-document set ({', '.join(MIXED_SETS)}).")
    if source == "fixture":
        folder = Path(str(resources.files("bts.data") / "fixtures" / "mixed"))
        prov = json.loads((folder / "provenance.json").read_text(encoding="utf-8"))[name]
        return _read(folder / f"{name}.jsonl"), prov
    folder = Path(cache_dir) / f"mixed-{name}" if cache_dir is not None else default_cache_dir() / f"mixed-{name}"
    prov = _read_provenance(folder)
    if prov is None or prov.get("format") != MIXED_FORMAT:
        prov = _prepare(name, folder)
    return _read(folder / "documents.jsonl"), prov


def _read(path: Path) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]


def _prepare(name: str, folder: Path) -> dict:
    pkg, version, build = _SETS[name]
    with tempfile.TemporaryDirectory(prefix=f"bts-mixed-{name}-") as tmp:
        try:
            docs, prov = build(Path(tmp))
        except (_SourceError, OSError, KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
            raise BTSError(f"mixed-document set {name}: could not obtain PyPI package {pkg}=={version} ({exc}); "
                           f"set data.mixed_docs=off to evaluate without it.") from None
    docs = [d for d in docs if d.text.strip()]
    prov.update(set=name, documents=len(docs), chars=sum(len(d.text) for d in docs), format=MIXED_FORMAT,
                prepared_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write_text(folder / "documents.jsonl", "".join(
        json.dumps(dataclasses.asdict(d), ensure_ascii=False) + "\n" for d in docs))
    atomic_write_json(folder / "provenance.json", prov)  # last: its presence marks a complete cache
    return prov


def _pip(spec: str, tmp: Path, sdist: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", spec, "-d", str(tmp)]
    _run(cmd + (["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]), tmp)


def _code_doc(tmp: Path) -> tuple[list[Document], dict]:
    _pip("absl-py==2.1.0", tmp)
    with zipfile.ZipFile(_one(tmp, "absl_py-*.whl")) as z:
        docs = [Document(n, n.split("/")[1] if n.count("/") > 1 else "absl", z.read(n).decode("utf-8"))
                for n in sorted(z.namelist()) if n.endswith(".py") and not n.endswith("__init__.py")]
    return docs, {"source": "PyPI package absl-py (Abseil Python: module files with license headers, docstrings, "
                            "comments)", "version": "2.1.0",
                  "command": "pip download --no-deps absl-py==2.1.0; read absl/**/*.py (no __init__.py)",
                  "license": "Apache-2.0"}


_SKIP_RST = {"changes.rst", "api.rst", "license.rst", "contrib.rst", "index.rst"}  # changelog, autodoc, boilerplate


def _prose_code(tmp: Path) -> tuple[list[Document], dict]:
    _pip("click==8.1.7", tmp, sdist=True)
    with tarfile.open(_one(tmp, "click-*.tar.gz")) as tar:
        docs = []
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 3 and parts[1] == "docs" and parts[2].endswith(".rst") \
                    and parts[2] not in _SKIP_RST:
                docs.append(Document(parts[2], parts[2], tar.extractfile(m).read().decode("utf-8")))
    return docs, {"source": "PyPI package click, sdist docs/*.rst (prose quoting Python code and shell sessions)",
                  "version": "8.1.7", "command": "pip download --no-deps --no-binary :all: click==8.1.7; read "
                  f"docs/*.rst except {', '.join(sorted(_SKIP_RST))}", "license": "BSD-3-Clause"}


def _math_prose(tmp: Path) -> tuple[list[Document], dict]:
    _pip("mpmath==1.3.0", tmp)
    with zipfile.ZipFile(_one(tmp, "mpmath-*.whl")) as z:
        tree = ast.parse(z.read("mpmath/function_docs.py").decode("utf-8"))
    docs = [Document(node.targets[0].id, node.targets[0].id, node.value.value.strip() + "\n") for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            and len(node.value.value) > 400]
    return docs, {"source": "PyPI package mpmath, mpmath/function_docs.py (each function's documentation: "
                            "mathematics in LaTeX explained in prose, with doctests)", "version": "1.3.0",
                  "command": "pip download --no-deps mpmath==1.3.0; ast-read the string constants "
                             "(> 400 chars) of mpmath/function_docs.py", "license": "BSD-3-Clause"}


_SETS = {"code_doc": ("absl-py", "2.1.0", _code_doc), "prose_code": ("click", "8.1.7", _prose_code),
         "math_prose": ("mpmath", "1.3.0", _math_prose)}


# ---- what each character of a document is (the gate heatmap's segments) -------------------------------------
def python_segments(text: str) -> list[tuple[int, str]]:
    """[(char start, kind)] over Python source, kind one of license, comment, docstring, code: where the kind
    changes. Comments before the first statement that mention a license are `license`; a string that is a whole
    statement is a `docstring`; blank lines join the segment before them. Unparsable text is all `code`."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    kind = ["code"] * len(text)
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return [(0, "code")]
    header, seen_code, prev = bool(re.search(r"licen[cs]e", text[:2000], re.I)), False, tokenize.NEWLINE

    def pos(rc):
        return starts[rc[0] - 1] + rc[1]

    for t in toks:
        a, b = pos(t.start), pos(t.end)
        if t.type == tokenize.COMMENT:
            label = "license" if header and not seen_code else "comment"
            kind[a:b] = [label] * (b - a)
        elif t.type == tokenize.STRING and prev in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                                    tokenize.NL, tokenize.ENCODING):
            kind[a:b] = ["docstring"] * (b - a)
        if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING, tokenize.INDENT,
                          tokenize.DEDENT, tokenize.ENDMARKER):
            seen_code = True
        if t.type not in (tokenize.COMMENT,):
            prev = t.type
    for i, ch in enumerate(text):  # whitespace belongs to what came before it
        if ch.isspace() and i:
            kind[i] = kind[i - 1]
    out = []
    for i, k in enumerate(kind):
        if not out or out[-1][1] != k:
            out.append((i, k))
    return out or [(0, "code")]


def write_mixed_fixtures(out_dir, cache_dir=None, max_chars: int = 16_000, doc_chars: int = 4_000) -> None:
    """Write the committed fixtures (bts/data/fixtures/mixed/<set>.jsonl + provenance.json): a seeded slice of
    each set, documents cut at a line break (bts.data.documents.fixture_slice)."""
    from bts.data.documents import fixture_slice

    out, provs = Path(out_dir), {}
    for name in MIXED_SETS:
        docs, prov = load_mixed(name, cache_dir=cache_dir)
        docs = fixture_slice([Document(d.id, d.id, d.text) for d in docs], max_chars, doc_chars, max_groups=8)
        atomic_write_text(out / f"{name}.jsonl", "".join(
            json.dumps(dataclasses.asdict(d), ensure_ascii=False) + "\n" for d in docs))
        provs[name] = {**{k: prov[k] for k in ("source", "version", "command", "license")}, "set": name,
                       "documents": len(docs), "chars": sum(len(d.text) for d in docs),
                       "note": "A small slice (documents cut at a line break) written by "
                               "bts.data.mixed.write_mixed_fixtures; used by tests and the smoke preset."}
    atomic_write_json(out / "provenance.json", provs)
