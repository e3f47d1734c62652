"""Natural mixed-document sets (bts.data.mixed): committed fixtures load offline, a failed fetch is one sentence
and caches nothing, the Python segment labels, and the run's disjointness filter (bts.pipeline.mixed)."""

from __future__ import annotations

import pytest

from bts.data import mixed
from bts.data.documents import Document
from bts.errors import BTSError
from bts.pipeline.mixed import disjoint, mixed_source


def _no_network(*args, **kwargs):
    raise AssertionError("the network was used")


def test_fixtures_load_offline_with_provenance_and_license(monkeypatch):
    monkeypatch.setattr(mixed, "_run", _no_network)
    for name in mixed.MIXED_SETS:
        docs, prov = mixed.load_mixed(name, "fixture")
        assert docs and all(d.text.strip() for d in docs)
        assert prov["license"] in ("Apache-2.0", "BSD-3-Clause") and prov["version"] and prov["command"]
        assert prov["documents"] == len(docs) and prov["chars"] == sum(len(d.text) for d in docs)


def test_a_failed_fetch_is_one_sentence_and_caches_nothing(monkeypatch, tmp_path):
    def fail(cmd, cwd):
        raise mixed._SourceError("`pip download` exited 1: no network")

    monkeypatch.setattr(mixed, "_run", fail)
    with pytest.raises(BTSError) as err:
        mixed.load_mixed("code_doc", "builtin", cache_dir=tmp_path)
    msg = str(err.value)
    assert "absl-py==2.1.0" in msg and "data.mixed_docs=off" in msg and "\n" not in msg
    assert not any(tmp_path.rglob("*"))  # nothing cached: the next run tries again


def test_unknown_set_is_refused():
    with pytest.raises(BTSError, match="'poems' is not a mixed-document set"):
        mixed.load_mixed("poems", "fixture")


def test_python_segments_label_license_docstring_comment_and_code():
    src = ('# Copyright 2024 A.\n# Licensed under the Apache License.\n\n"""Module doc."""\n\nimport os\n\n'
           'def f(x):\n    """Say x."""\n    # add one\n    return x + 1  # done\n')
    segs = mixed.python_segments(src)
    kinds = [k for _, k in segs]
    assert kinds[0] == "license" and segs[0][0] == 0
    assert kinds == ["license", "docstring", "code", "docstring", "comment", "code", "comment"]
    at = {k: a for a, k in reversed(segs)}
    assert src[at["docstring"]:].startswith('"""Module doc."""') and src[at["code"]:].startswith("import os")
    # Every character is labelled: the starts are increasing and begin at 0.
    starts = [a for a, _ in segs]
    assert starts == sorted(set(starts)) and starts[0] == 0
    assert mixed.python_segments("def f(:\n  '''") == [(0, "code")]  # unparsable: all code


def test_disjoint_drops_copies_and_near_copies_of_training_text():
    from bts.pipeline.mixed import _digest, _long_lines

    train = "def train_only():\n    return 'a line that is certainly longer than forty characters'\n"
    digests, lines = {_digest(train)}, _long_lines(train)
    docs = [Document("copy", "g", "  " + train.replace("\n", "\n\n")),  # same text up to whitespace
            Document("near", "g", "x = 1\n    return 'a line that is certainly longer than forty characters'\n"),
            Document("own", "g", "print('a wholly different line, also longer than forty chars')\n"
                                 "print('and one more of its own, again longer than forty chars')\n" + train)]
    kept, info = disjoint(docs, digests, lines)
    assert [d.id for d in kept] == ["own"] and info["dropped"] == ["copy", "near"]
    assert info["shared_long_lines"] == pytest.approx(round(1 / 3, 4))


def test_mixed_source_auto_follows_the_domains():
    class R:
        def __init__(self, chosen, *sources):
            self.data = type("D", (), {"mixed_docs": chosen,
                                       "domains": {str(i): type("S", (), {"source": s})() for i, s in
                                                   enumerate(sources)}})()

    assert mixed_source(R("auto", "fixture", "fixture")) == "fixture"
    assert mixed_source(R("auto", "builtin", "files")) == "builtin"
    assert mixed_source(R("auto", "files", "hf")) == "off"
    assert mixed_source(R("off", "builtin")) == "off"


def test_a_run_without_network_scores_the_other_sets_and_tries_again(monkeypatch, tmp_path):
    """prepare_mixed_docs: a set that cannot be fetched is logged in one sentence, recorded as missing and
    fetched again next time; the others are written."""
    from types import SimpleNamespace

    from bts.pipeline import mixed as run_mixed

    calls = []

    def load(name, source):
        calls.append(name)
        if name == "code_doc" and len(calls) <= 3:
            raise BTSError("mixed-document set code_doc: could not obtain PyPI package absl-py==2.1.0 (offline).")
        return mixed.load_mixed(name, "fixture")

    monkeypatch.setattr(run_mixed, "load_mixed", load)
    monkeypatch.setattr(run_mixed, "training_fingerprints", lambda run: (set(), set()))
    recipe = SimpleNamespace(data=SimpleNamespace(mixed_docs="builtin", domains={}))
    run = SimpleNamespace(recipe=recipe, path=lambda *p: tmp_path.joinpath(*p))
    prov = run_mixed.prepare_mixed_docs(run)
    assert "absl-py==2.1.0" in prov["code_doc"]["missing"] and not (tmp_path / "data/mixed/code_doc.jsonl").exists()
    assert prov["prose_code"]["documents"] > 0 and (tmp_path / "data/mixed/prose_code.jsonl").exists()
    prov = run_mixed.prepare_mixed_docs(run)  # the network is back
    assert "missing" not in prov["code_doc"] and (tmp_path / "data/mixed/code_doc.jsonl").exists()
