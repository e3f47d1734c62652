"""The data stage's streaming preparation (bts.data.prepare) and the sources read incrementally (bts.data.sources):
the same splits as the list path, every file kind, and bad input refused in one sentence with nothing written."""

from __future__ import annotations

import gzip
import json

import pytest

from helpers import TINY, tiny_tokenizer
from bts.cli.child import run_cli
from bts.data import sources
from bts.data.corpora import load_domain, split_by_group
from bts.data.prepare import prepare_domain, read_split
from bts.errors import BTSError


def files(*paths, **kw):
    return {"source": "files", "files": [str(p) for p in paths], "max_chars": 0, **kw}


def written(out) -> dict:
    return {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()]
            for s in ("train", "val", "heldout")}


def as_rows(docs):
    return [{"id": d.id, "group": d.group, "text": d.text} for d in docs]


@pytest.mark.parametrize("max_chars", [0, 60_000])
def test_streamed_splits_equal_the_list_path(tmp_path, max_chars):
    spec = {"source": "fixture", "max_chars": max_chars}
    info = prepare_domain("prose", spec, tmp_path / "prose", seed=3)
    expected = split_by_group(load_domain("prose", {**spec, "max_chars": 0}), seed=3, max_chars=max_chars)
    assert written(tmp_path / "prose") == {s: as_rows(d) for s, d in expected.items()}
    assert info["splits"]["train"]["documents"] == len(expected["train"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prose"]  # no spool or temporary folder left


def test_every_file_kind_is_read_incrementally(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(sources, "TXT_PIECE", 100)
    big = "".join(f"line {i} of a long text file\n" for i in range(40))
    (tmp_path / "a.txt").write_text(big, encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"gz row {i}", "book": f"b{i % 2}"}) + "\n")
    pq.write_table(pa.table({"text": [f"pq row {i}" for i in range(3000)], "book": ["p"] * 3000}),
                   tmp_path / "c.parquet", row_group_size=700)
    docs = load_domain("d", files(tmp_path / "*.txt", tmp_path / "*.gz", tmp_path / "*.parquet",
                                  group_field="book"))
    txt = [d for d in docs if d.group.endswith("a.txt")]
    assert len(txt) > 5 and "".join(d.text for d in txt) == big  # pieces cut at line breaks, one group
    assert all(d.text.endswith("\n") for d in txt)
    assert [d.text for d in docs if d.group.startswith("b")] == [f"gz row {i}" for i in range(5)]
    assert [d.text for d in docs if d.group == "p"] == [f"pq row {i}" for i in range(3000)]


def test_bytes_that_are_not_utf8_are_replaced_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text("fine text\n" * 20, encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 and \xff\xfe here\n" * 20)
    info = prepare_domain("d", files(tmp_path / "*.txt"), tmp_path / "out", fractions=(0.5, 0.5, 0.0))
    assert info["replaced_bytes"] == 60 and info["replaced_in"] == [str(tmp_path / "bad.txt")]
    texts = [t for s in ("train", "val") for t, _ in read_split(tmp_path / "out" / f"{s}.jsonl")]
    assert "caf\ufffd and \ufffd\ufffd here\n" * 20 in texts


def _bad_jsonl(tmp):
    (tmp / "1.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(50)))
    (tmp / "2.jsonl").write_text('{"text": "ok"}\n\n{"text": oops}\n')
    return files(tmp / "*.jsonl"), [str(tmp / "2.jsonl"), "line 3 is not valid JSON"]


def _parquet_without_column(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp / "t.parquet")
    return files(tmp / "t.parquet"), ["text_field 'text' is not a column of", "t.parquet", "columns: body"]


def _glob_nothing(tmp):
    return files(tmp / "none" / "*.jsonl"), ["no file matches", "none/*.jsonl"]


def _empty_after_filtering(tmp):
    (tmp / "blank.jsonl").write_text(json.dumps({"text": "   "}) + "\n" + json.dumps({"text": None}) + "\n")
    return files(tmp / "blank.jsonl"), ["data.domains.d", "no non-empty documents", "blank.jsonl"]


@pytest.mark.parametrize("make", [_bad_jsonl, _parquet_without_column, _glob_nothing, _empty_after_filtering])
def test_bad_input_is_one_sentence_naming_it_and_nothing_is_written(tmp_path, make):
    spec, needles = make(tmp_path)
    out = tmp_path / "run" / "data" / "d"
    with pytest.raises(BTSError) as err:
        prepare_domain("d", spec, out)
    message = str(err.value)
    assert message.endswith(".") and "\n" not in message
    for needle in needles:
        assert needle in message
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.glob(".*"))  # no temporary folder left either


def test_a_bad_jsonl_line_through_the_cli_exits_2_and_no_domain_is_written(tmp_path):
    _bad_jsonl(tmp_path)
    domains = f"{{code: {{source: fixture}}, mine: {{source: files, files: ['{tmp_path}/*.jsonl']}}}}"
    rc = run_cli(["run", "smoke", *TINY, f"data.domains={domains}", "--run-dir", str(tmp_path / "run")],
                 tmp_path / "log")
    errors = [x for x in (tmp_path / "log").read_text().splitlines() if x.startswith("bts: error:")]
    assert rc == 2 and len(errors) == 1 and "2.jsonl line 3 is not valid JSON." in errors[0]
    assert not (tmp_path / "run" / "data" / "mine").exists()
    assert not (tmp_path / "run" / "stages" / "data.json").exists()
    assert not list((tmp_path / "run" / "data").glob(".*"))


def test_shards_of_another_tokenizer_are_refused_through_the_cli(tmp_path):
    run = tmp_path / "run"
    assert run_cli(["run", "smoke", *TINY, "--stages", "data,tokenizer", "--run-dir", str(run)], tmp_path / "log") == 0
    assert (run / "data/code/train.tokens/meta.json").exists()  # the tokenizer stage wrote every shard
    tiny_tokenizer(vocab_size=300).save_pretrained(run / "tokenizer")  # the run's tokenizer replaced
    rc = run_cli(["run", "smoke", *TINY, "--stages", "seed", "--run-dir", str(run)], tmp_path / "log")
    errors = [x for x in (tmp_path / "log").read_text().splitlines() if x.startswith("bts: error:")]
    assert rc == 2 and len(errors) == 1, (tmp_path / "log").read_text()[-2000:]
    assert "train.tokens was tokenized by another tokenizer" in errors[0] and errors[0].endswith(".")
    assert not (run / "stages/seed.json").exists()


def test_hf_datasets_can_stream(monkeypatch):
    import datasets

    class Streamed:  # an IterableDataset: no columns known before the first row
        column_names = None

        def __iter__(self):
            return iter([{"text": "first"}, {"text": ""}, {"text": "second"}])

    calls = {}

    def fake_load(name, config, split, streaming):
        calls.update(name=name, streaming=streaming)
        return Streamed()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = load_domain("w", {"source": "hf", "dataset": "some/set", "streaming": True})
    assert calls == {"name": "some/set", "streaming": True}
    assert [d.text for d in docs] == ["first", "second"]
