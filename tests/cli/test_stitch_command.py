"""`bts stitch`: stitch layers trained over given models on given text, written as a model AutoModelForCausalLM
loads; the same command resumes after a kill, bit for bit; every bad input is one sentence, exit 2, nothing written."""

import hashlib
import shutil
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bts.data
from bts.cli.child import run_cli
from bts.errors import BTSError
from helpers import random_ids, save_tiny_members, tiny_model, tiny_tokenizer

FIXTURES = Path(bts.data.__file__).parent / "fixtures"
DATA = [str(FIXTURES / "code" / "documents.jsonl"), str(FIXTURES / "math" / "*.jsonl")]
SETTINGS = ["stitch.num_stitches=2", "data.seq_len=32", "train.batch_size=4", "train.warmup=2", "train.lr=3e-3",
            "train.log_every=1", "train.ckpt_every=2"]
STEPS = 6


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    return save_tiny_members(tmp_path_factory.mktemp("members"))


def argv(members, out, *extra, steps=STEPS):
    return ["stitch", "--hub", str(members / "hub"), "--experts", str(members / "code"), str(members / "math"),
            "--data", *DATA, "--steps", str(steps), "--out", str(out), *SETTINGS, *extra]


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(members, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    log = out.parent / "log.txt"
    assert run_cli(argv(members, out), log) == 0, log.read_text()
    return out, log.read_text()


def test_resume_after_a_kill_ends_where_an_uninterrupted_run_ends(members, uninterrupted, tmp_path):
    whole, _ = uninterrupted
    out = tmp_path / "out"
    assert run_cli(argv(members, out), tmp_path / "1.txt", fault="stitch:3") == -9
    assert not (out / "stitch.safetensors").exists()  # killed mid-training: checkpoints only
    assert sorted(p.name for p in (out / "training" / "ckpt").iterdir()) == ["step-0000002"]
    shard = out / "training" / "text.tokens" / "tokens.bin"
    written = (shard.stat().st_ino, shard.stat().st_mtime_ns)
    assert run_cli(argv(members, out), tmp_path / "2.txt") == 0, (tmp_path / "2.txt").read_text()
    assert (shard.stat().st_ino, shard.stat().st_mtime_ns) == written  # the shard was reused, not tokenized again
    assert "step 3/6" in (tmp_path / "2.txt").read_text() and "step 2/6" not in (tmp_path / "2.txt").read_text()
    a, b = load_file(whole / "stitch.safetensors"), load_file(out / "stitch.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (d / "training" / "metrics.jsonl").read_text().splitlines()]
              for d in (whole, out)]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS
    # the stitches did train: not a fresh model's initial values any more
    from bts.core.model import BTSForCausalLM

    init = BTSForCausalLM.from_members(str(members / "hub"), [str(members / "code"), str(members / "math")],
                                       num_stitches=2).stitches.state_dict()
    assert init.keys() == a.keys() and not all(torch.equal(a[k], init[k]) for k in a)


def test_a_kill_while_tokenizing_leaves_nothing_read_and_the_rerun_writes_the_same_shard(members, uninterrupted,
                                                                                        tmp_path):
    whole, _ = uninterrupted
    out = tmp_path / "out"
    assert run_cli(argv(members, out), tmp_path / "1.txt", fault="shard:stitch:0") == -9
    assert not (out / "training" / "text.tokens").exists() and list((out / "training").glob(".text.tokens.tmp-*"))
    assert run_cli(argv(members, out), tmp_path / "2.txt") == 0, (tmp_path / "2.txt").read_text()
    assert not list((out / "training").glob(".text.tokens.tmp-*"))  # the killed run's half shard is gone
    assert tree_digest(out / "training" / "text.tokens") == tree_digest(whole / "training" / "text.tokens")
    a, b = load_file(whole / "stitch.safetensors"), load_file(out / "stitch.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_changed_text_is_refused_on_resume_unless_forced(members, tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text((FIXTURES / "code" / "documents.jsonl").read_text())
    out = tmp_path / "out"
    args = argv(members, out)
    args[args.index(DATA[0])] = str(mine)
    assert run_cli(args, tmp_path / "1.txt", fault="stitch:3") == -9
    job = json.loads((out / "training" / "job.json").read_text())
    assert [[f[:2] for f in s["files"]] for s in job["sources"]] == [[[str(mine), mine.stat().st_size], *(
        [str(f), f.stat().st_size] for f in sorted((FIXTURES / "math").glob("*.jsonl")))]]  # path, size, mtime_ns
    with open(mine, "a") as f:
        f.write(json.dumps({"text": "def more():\n    return 1\n"}) + "\n")
    before = tree_digest(out)
    log = tmp_path / "2.txt"
    assert run_cli(args, log) == 2
    assert log.read_text().strip() == (f"bts: error: the text of --data / --data-hf has changed since the run in "
                                       f"--out '{out}' began; use a new --out or pass --force to start over.")
    assert tree_digest(out) == before
    assert run_cli([*args, "--force"], log) == 0, log.read_text()
    metrics = [json.loads(x)["step"] for x in (out / "training" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, STEPS + 1))  # started over: the new text was tokenized, training from step 0
    assert json.loads((out / "training" / "job.json").read_text())["tokens"] > job["tokens"]


def test_max_chars_and_max_tokens_cap_the_shard_as_the_loaders_do(members, tmp_path):
    """data.max_chars keeps the documents cap_documents keeps (round-robin over all the sources' groups), in order;
    data.max_tokens keeps the first tokens."""
    from bts.data.corpora import cap_documents, load_domain
    from bts.data.shards import Shard
    from bts.data.streams import tokenize_stream
    from bts.pipeline.stitch_job import stitch_job

    docs = [d for pattern in DATA for d in load_domain("x", {"source": "files", "files": [pattern], "max_chars": 0})]
    total = sum(len(d.text) for d in docs)
    expected = tokenize_stream(tiny_tokenizer(), [d.text for d in cap_documents(docs, total // 3)])
    for extra, want in ((f"data.max_chars={total // 3}", expected), ("data.max_tokens=700", None)):
        out = tmp_path / extra.split("=")[0]
        stitch_job(str(members / "hub"), [str(members / "code")], DATA, steps=1, out=out,
                   overrides=[*SETTINGS, extra], device="cpu")
        shard = Shard(out / "training" / "text.tokens")
        if want is None:
            assert len(shard) == 700 and json.loads((out / "training" / "job.json").read_text())["tokens"] == 700
        else:
            assert 0 < len(want) and torch.equal(shard[0:len(shard)], want)


def test_progress_lines_with_eta_reach_a_non_tty(uninterrupted):
    _, log = uninterrupted
    lines = [x for x in log.splitlines() if x.startswith("[stitch] step")]
    assert len(lines) == STEPS and all(" eta " in x and x.endswith("s") for x in lines)
    assert "stitches after blocks [2, 4]" in log and "saved" in log


def test_the_saved_folder_loads_with_auto_classes_and_matches_the_trained_model(members, tmp_path):
    import bts  # noqa: F401 - registers the model type
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bts.pipeline.stitch_job import stitch_job

    out = tmp_path / "out"
    model = stitch_job(str(members / "hub"), [str(members / "code"), str(members / "math")], DATA, steps=STEPS,
                       out=out, overrides=SETTINGS, device="cpu")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded) is type(model) and loaded.config.expert_names == ["code", "math"]
    ids = random_ids(2, 16)
    with torch.no_grad():
        mine, theirs = model(ids).logits, loaded(ids).logits
        hub = AutoModelForCausalLM.from_pretrained(members / "hub").eval()(ids).logits
    assert torch.equal(mine, theirs)
    assert not torch.equal(theirs, hub)  # the trained stitches are what was loaded: the output is not the hub's
    text = "def add(a, b):\n    return a + b"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(members / "hub")(
        text).input_ids


def test_rerunning_a_finished_command_changes_nothing(members, uninterrupted, tmp_path):
    out, _ = uninterrupted
    before = tree_digest(out)
    assert run_cli(argv(members, out), tmp_path / "log.txt") == 0
    assert "already a finished run of this command" in (tmp_path / "log.txt").read_text()
    assert tree_digest(out) == before


def test_data_hf_reads_a_cached_dataset(members, tmp_path, monkeypatch):
    import datasets

    from bts.data.streams import tokenize_stream
    from bts.pipeline.stitch_job import stitch_job

    texts = [json.loads(x)["text"] for x in (FIXTURES / "prose" / "documents.jsonl").read_text().splitlines()[:20]]
    asked = []

    def load_dataset(name, config=None, split=None, streaming=False):
        asked.append((name, config, split))
        return datasets.Dataset.from_dict({"body": texts})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    stitch_job(str(members / "hub"), [str(members / "code")], data_hf=["local/books:v2:validation"], steps=2,
               out=tmp_path / "out", overrides=[*SETTINGS, "data.text_field=body"], device="cpu")
    assert set(asked) == {("local/books", "v2", "validation")}  # read, and its cache files fingerprinted
    job = json.loads((tmp_path / "out" / "training" / "job.json").read_text())
    assert job["complete"] and job["tokens"] == len(tokenize_stream(tiny_tokenizer(), texts))


# ---- bad input: one sentence, exit 2, nothing written -------------------------------------------------------------
@pytest.fixture(scope="module")
def bad(members):
    tok = tiny_tokenizer()
    tiny_model(hidden_size=48, vocab_size=len(tok)).save_pretrained(members / "wide")
    tok.save_pretrained(members / "wide")
    tiny_model(vocab_size=len(tok)).save_pretrained(members / "othertok")
    tiny_tokenizer(300).save_pretrained(members / "othertok")
    (members / "notamodel").mkdir()
    (members / "notamodel" / "notes.txt").write_text("not a model")
    (members / "short.txt").write_text("too short")
    good = (FIXTURES / "code" / "documents.jsonl").read_text().splitlines()[:2]
    (members / "bad.jsonl").write_text("\n".join([*good, "{not json", *good]) + "\n")  # found while tokenizing
    return members


def swap_expert(members, out, expert):
    args = argv(members, out)
    args[args.index(str(members / "math"))] = expert
    return args


@pytest.mark.parametrize("case, fragment", [
    ("nomatch", "--data '{m}/nothing/*.txt' matches no file."),
    ("notamodel", "--experts '{m}/notamodel' has no readable config.json"),
    ("othertok", "--experts '{m}/othertok': expert 'othertok' has a different tokenizer from the hub"),
    ("wide", "--experts '{m}/wide': expert 'wide' has hidden_size=48 but the hub has hidden_size=32"),
    ("hubid", "--hub 'nobody/not-cached' is neither a local model directory nor a hub id in the local cache."),
    ("hfid", "--data-hf 'nobody/not-cached' (config '', split 'train') could not be loaded"),
    ("short", "the text of --data / --data-hf is"),
    ("override", "stitch.general_weight is not a bts stitch option"),
    ("layout", "stitch.num_stitches must be at most the 4 layers of --hub '{m}/hub' (got 9)."),
    ("lr", "train.lr must be positive (got -1.0)."),
    ("maxtokens", "data.max_tokens must be ≥ 0 (0 = all) (got -1)."),
    ("badline", "--data: {m}/bad.jsonl line 3 is not valid JSON."),
    ("device", "--device is 'cuda' but torch"),
])
def test_bad_input_is_one_sentence_and_writes_nothing(bad, tmp_path, case, fragment):
    out = tmp_path / "out"
    args = {
        "nomatch": lambda: argv(bad, out)[:9] + [f"{bad}/nothing/*.txt", "--steps", "2", "--out", str(out)],
        "notamodel": lambda: swap_expert(bad, out, str(bad / "notamodel")),
        "othertok": lambda: swap_expert(bad, out, str(bad / "othertok")),
        "wide": lambda: swap_expert(bad, out, str(bad / "wide")),
        "hubid": lambda: ["stitch", "--hub", "nobody/not-cached", *argv(bad, out)[3:]],
        "hfid": lambda: [*argv(bad, out), "--data-hf", "nobody/not-cached"],
        "short": lambda: argv(bad, out)[:7] + [str(bad / "short.txt"), "--steps", "2", "--out", str(out)],
        "override": lambda: argv(bad, out, "stitch.general_weight=0.5"),
        "layout": lambda: argv(bad, out, "stitch.num_stitches=9"),
        "lr": lambda: argv(bad, out, "train.lr=-1"),
        "maxtokens": lambda: argv(bad, out, "data.max_tokens=-1"),
        "badline": lambda: argv(bad, out)[:9] + [str(bad / "bad.jsonl"), "--steps", "2", "--out", str(out)],
        "device": lambda: argv(bad, out, "--device", "cuda"),
    }[case]()
    log = tmp_path / "log.txt"
    assert run_cli(args, log) == 2, log.read_text()
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("bts: error: " + fragment.format(m=bad)), lines
    assert not out.exists()


def test_a_non_empty_out_that_is_no_stitch_run_is_refused_unless_forced(members, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    log = tmp_path / "log.txt"
    assert run_cli(argv(members, out, steps=2), log) == 2
    assert log.read_text().startswith(f"bts: error: --out '{out}' is not empty and holds no bts stitch run")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert run_cli(argv(members, out, "--force", steps=2), log) == 0, log.read_text()
    assert (out / "stitch.safetensors").is_file() and (out / "mine.txt").read_text() == "keep me"


def test_another_command_in_a_previous_out_is_refused_and_force_starts_over(members, uninterrupted, tmp_path):
    whole, _ = uninterrupted
    out = tmp_path / "out"
    import shutil

    shutil.copytree(whole, out)
    before = tree_digest(out)
    log = tmp_path / "log.txt"
    assert run_cli(argv(members, out, steps=STEPS + 2), log) == 2
    assert "holds a bts stitch run of another command (options.train.steps was 6, now 8)" in log.read_text()
    assert tree_digest(out) == before
    assert run_cli(argv(members, out, "--force", steps=STEPS + 2), log) == 0, log.read_text()
    job = json.loads((out / "training" / "job.json").read_text())
    assert job["complete"] and job["command"]["options"]["train"]["steps"] == STEPS + 2
    metrics = [json.loads(x)["step"] for x in (out / "training" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, STEPS + 3))  # trained from step 0 again, not resumed from the other run


def test_a_gpu_reported_present_is_used_not_skipped(members, tmp_path, monkeypatch):
    """With torch.cuda.is_available patched to report a GPU, --device auto moves the model to CUDA (which this
    CPU-only torch then cannot do) instead of silently training on the CPU; nothing is written."""
    from bts.pipeline.stitch_job import stitch_job

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "out"
    with pytest.raises((AssertionError, RuntimeError, BTSError), match="(?i)not compiled with cuda"):
        stitch_job(str(members / "hub"), [str(members / "code")], DATA, steps=2, out=out, overrides=SETTINGS)
    assert not out.exists()


def test_the_same_command_typed_another_way_resumes_the_same_run(members, uninterrupted, tmp_path, monkeypatch):
    """A trailing slash, a relative path, the files a glob expands to, another checkpoint or log interval: the same
    run (it resumes, or is already finished), not 'another command'."""
    import glob

    whole, _ = uninterrupted
    out = tmp_path / "out"
    assert run_cli(argv(members, out), tmp_path / "1.txt", fault="stitch:3") == -9
    expanded = [DATA[0], *sorted(glob.glob(DATA[1]))]
    monkeypatch.chdir(members)
    again = ["stitch", "--hub", "hub/", "--experts", "./code", str(members / "math") + "/", "--data", *expanded,
             "--steps", str(STEPS), "--out", str(out), *[s for s in SETTINGS if "every" not in s],
             "train.log_every=3", "train.ckpt_every=5"]
    assert run_cli(again, tmp_path / "2.txt") == 0, (tmp_path / "2.txt").read_text()
    assert "resuming from the last checkpoint" in (tmp_path / "2.txt").read_text()
    a, b = load_file(whole / "stitch.safetensors"), load_file(out / "stitch.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, key", [(["--members-dtype", "bfloat16"], "members_dtype"),
                                        (["train.lr=1e-3"], "options.train.lr")])
def test_a_change_that_changes_the_result_is_another_command(members, uninterrupted, tmp_path, extra, key):
    whole, _ = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    before = tree_digest(out)
    log = tmp_path / "log.txt"
    assert run_cli(argv(members, out, *extra), log) == 2
    assert f"holds a bts stitch run of another command ({key} was" in log.read_text()
    assert tree_digest(out) == before


def test_more_steps_is_refused_with_the_reason(members, uninterrupted, tmp_path):
    whole, _ = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    log = tmp_path / "log.txt"
    assert run_cli(argv(members, out, steps=STEPS + 4), log) == 2
    assert "another learning-rate schedule, not a continuation" in log.read_text()


def test_export_writes_a_folder_that_carries_its_members(members, uninterrupted, tmp_path):
    import bts  # noqa: F401
    from transformers import AutoModelForCausalLM

    whole, _ = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    assert run_cli(argv(members, out, "--export"), tmp_path / "log.txt") == 0, (tmp_path / "log.txt").read_text()
    assert sorted(p.name for p in (out / "members").iterdir()) == ["code", "hub", "math"]
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    config = json.loads((moved / "config.json").read_text())
    assert all(not Path(m["path"]).is_absolute() for m in config["members"])
    ids = random_ids(1, 12, 300)
    model = AutoModelForCausalLM.from_pretrained(moved).eval()
    reference = AutoModelForCausalLM.from_pretrained(whole).eval()
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
