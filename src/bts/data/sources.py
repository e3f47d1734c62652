"""User sources of a domain, read incrementally: local files (txt, jsonl, jsonl.gz, parquet) and Hugging Face
datasets (from the local cache, or `streaming: true`).

txt (any other suffix) = one document per file, grouped by file (a file over TXT_PIECE characters is cut at line
breaks into several documents of that one group, so no file is ever read whole); jsonl / jsonl.gz / parquet = one
document per row, grouped by `group_field` when given, else each row is its own group. Every reader is a
generator: a corpus of any size passes through in pieces. Bytes that are not UTF-8 are replaced by U+FFFD and
counted in `stats["replaced_bytes"]`, never a crash. Called by bts.data.corpora.iter_domain with a normalised
spec (a dict with the fields of bts.pipeline.recipe.DomainSpec).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
from typing import Iterator

from bts.data.documents import Document
from bts.errors import BTSError

TXT_PIECE = 4_000_000  # characters: a bigger txt file becomes several documents (of one group), cut at a line break


class _Replacements:
    """Counts the bytes that one read replaced (the codecs handler "bts-replace" adds to the current counter)."""

    current = None

    def __init__(self):
        self.count = 0


def _replace_and_count(exc: UnicodeDecodeError):
    if _Replacements.current is not None:
        _Replacements.current.count += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("bts-replace", _replace_and_count)


def _open_text(path: str, counter: _Replacements):
    _Replacements.current = counter  # one file is decoded at a time
    raw = gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="bts-replace", newline="")


def matched_files(name: str, files: list) -> list[str]:
    """The files a domain's globs match, in glob order; a glob matching nothing is refused (no file is read)."""
    if not files:
        raise BTSError(f"data.domains.{name}.files is empty but source is 'files'.")
    paths: list[str] = []
    for pattern in files:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if not os.path.isdir(m)]
        if not matches or not os.path.exists(matches[0]):
            raise BTSError(f"data.domains.{name}.files: no file matches '{pattern}'.")
        paths.extend(matches)
    return paths


def iter_files(name: str, s: dict, stats: dict) -> Iterator[Document]:
    """Documents of every file the globs match, in glob order; a glob matching nothing is refused before any read."""
    return _iter_paths(name, s, check_files(name, s), stats)


def check_files(name: str, s: dict) -> list[str]:
    """A files domain's matched files, with every glob matching something and every parquet file holding the text
    column (schemas only: cheap enough to ask before a run writes anything)."""
    paths = matched_files(name, s["files"])
    for path in paths:
        if path.lower().endswith((".parquet", ".pq")):
            _check_parquet(name, s, path)
    return paths


def _iter_paths(name, s, paths, stats):
    for path in paths:
        low = path.lower()
        counter = _Replacements()
        if low.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
            yield from _rows_to_docs(name, s, _jsonl_rows(name, path, counter))
        elif low.endswith((".parquet", ".pq")):
            yield from _rows_to_docs(name, s, _parquet_rows(name, s, path))
        else:
            yield from _txt_docs(path, counter)
        if counter.count:
            stats["replaced_bytes"] = stats.get("replaced_bytes", 0) + counter.count
            stats.setdefault("replaced_in", []).append(path)


def _txt_docs(path: str, counter: _Replacements) -> Iterator[Document]:
    """One document per file; a file over TXT_PIECE characters in several pieces cut at line breaks."""
    with _open_text(path, counter) as f:
        piece, size, k = [], 0, 0
        for line in f:
            piece.append(line)
            size += len(line)
            if size >= TXT_PIECE:
                yield Document(path if k == 0 else f"{path}#{k}", path, "".join(piece))
                piece, size, k = [], 0, k + 1
        text = "".join(piece)
        if text.strip():
            yield Document(path if k == 0 else f"{path}#{k}", path, text)


def _jsonl_rows(name: str, path: str, counter: _Replacements):
    with _open_text(path, counter) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise BTSError(f"data.domains.{name}.files: {path} line {lineno} is not valid JSON.") from None
            if not isinstance(row, dict):
                raise BTSError(f"data.domains.{name}.files: {path} line {lineno} is not a JSON object.")
            yield f"{path}:{lineno}", row


def _check_parquet(name: str, s: dict, path: str) -> None:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        columns = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise BTSError(f"data.domains.{name}.files: {path} is not a readable parquet file ({exc}).") from None
    for key in ("text_field", "group_field"):
        if s[key] and s[key] not in columns:
            raise BTSError(f"data.domains.{name}.{key} '{s[key]}' is not a column of {path} "
                           f"(columns: {', '.join(columns)}).")


def _parquet_rows(name: str, s: dict, path: str):
    import pyarrow.parquet as pq

    wanted = [c for c in (s["text_field"], s["group_field"]) if c]
    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=wanted):  # a row group at most
        for row in batch.to_pylist():
            yield f"{path}:{i}", row
            i += 1


def _rows_to_docs(name: str, s: dict, rows) -> Iterator[Document]:
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
        if text.strip():
            yield Document(row_id, group, text)


def iter_hf(name: str, s: dict, stats: dict) -> Iterator[Document]:
    """Rows of a Hugging Face dataset: from the local cache, or read as they arrive with `streaming: true`."""
    if not s["dataset"]:
        raise BTSError(f"data.domains.{name}.dataset is empty but source is 'hf'.")
    import datasets

    try:
        ds = datasets.load_dataset(s["dataset"], s["config"] or None, split=s["split"],
                                   streaming=bool(s.get("streaming")))
    except Exception as exc:  # offline misses surface as several exception types across datasets versions
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BTSError(f"data.domains.{name}.dataset '{s['dataset']}' (config '{s['config']}', split "
                       f"'{s['split']}') could not be loaded; only datasets already in the local Hugging Face "
                       f"cache work offline ({type(exc).__name__}: {first}).") from None
    columns = ds.column_names
    if columns is not None:  # a streamed dataset may not know its columns before the first row
        for key in ("text_field", "group_field"):
            if s[key] and s[key] not in columns:
                raise BTSError(f"data.domains.{name}.{key} '{s[key]}' is not a column of dataset "
                               f"'{s['dataset']}' (columns: {', '.join(columns)}).")
    rows = ((f"{s['dataset']}:{s['split']}:{i}", row) for i, row in enumerate(ds))
    return _rows_to_docs(name, s, rows)

