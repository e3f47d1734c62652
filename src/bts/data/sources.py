"""User sources of a domain: local files (txt, jsonl, parquet) and Hugging Face datasets from the local cache.

txt (any suffix) = one document per file, grouped by file; jsonl / parquet = one document per row, grouped by
`group_field` when given, else each row is its own group. Called by bts.data.corpora.load_domain with a
normalised spec (a dict with the fields of bts.pipeline.recipe.DomainSpec).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from bts.data.documents import Document
from bts.errors import BTSError


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
