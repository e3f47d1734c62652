"""Data path at scale: preparation throughput, batch-reader headroom, and peak memory against corpus size.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py [--sizes-mb 200 1000] [--processes 0] [--skip-reader]

1. Preparation: for each size, a synthetic local corpus of 500 KB txt files (random words; generated once under
   /tmp/bts-bench-corpus-<MB>) goes through `bts run` stages data and tokenizer in a child process (source: files,
   max_chars: 0, a 2,048-entry BPE): streaming to the split files, BPE training, and the token shards. Printed:
   tokens/s of the whole preparation (process start included), and the child's peak memory, both as the PSS
   summed over its process tree sampled from /proc every 0.1 s (the forked tokenization workers included, shared
   pages once) and as the peak RSS of the largest single process (getrusage RUSAGE_CHILDREN). The bound is
   1.5 GB, and it must not grow with the corpus: the ratio of the peaks of the largest and the smallest corpus is
   printed.
2. Reader: tokens/s of Batcher(step) reading windows from a shard's memory map (demo stitch batches: 8 × 128),
   against the tokens/s one demo-size stitch step consumes (4 experts of the demo seed, 4 stitches, measured with
   bench_train.bench_step on this machine). The reader must be ≥ 20× faster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).parent))
RSS_BOUND = 1.5e9
READER_TARGET = 20.0


def make_corpus(mb: int, file_kb: int = 500) -> Path:
    """mb megabytes of random-word text in file_kb files (cached: generated once per size)."""
    out = Path(tempfile.gettempdir()) / f"bts-bench-corpus-{mb}"
    done = out / ".complete"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(mb)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(20_000)], dtype=object)
    per_file = file_kb * 1000
    for i in range(mb * 1000 // file_kb):
        text = " ".join(words[rng.zipf(1.3, size=per_file // 5) % len(words)])[:per_file]
        lines = "\n".join(text[j:j + 80] for j in range(0, len(text), 80))
        (out / f"doc{i:05d}.txt").write_text(lines + "\n", encoding="utf-8")
    done.write_text("")
    return out


def tree_rss(pid: int) -> int:
    """Proportional resident bytes (PSS) of pid and all its descendants (from /proc): pages a forked worker shares
    with its parent are counted once, not once per process as a sum of RSS would."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
            for t in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split())
        except (OSError, ValueError):
            continue
    return total


def prepare(mb: int, processes: int) -> dict:
    corpus = make_corpus(mb)
    run_dir = Path(tempfile.mkdtemp(prefix=f"bts-bench-run-{mb}-"))
    recipe = run_dir.parent / f"{run_dir.name}.yaml"
    recipe.write_text(json.dumps({
        "name": "bench-data", "data": {"seq_len": 128, "processes": processes, "domains": {
            "big": {"source": "files", "files": [str(corpus / "*.txt")], "max_chars": 0}}},
        "tokenizer": {"vocab_size": 2048, "train_chars": 2_000_000}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bts", "run", str(recipe), "--stages", "data,tokenizer", "--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        while child.poll() is None:
            peak[0] = max(peak[0], tree_rss(child.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = child.communicate()[0]
    wall = time.perf_counter() - t0
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"preparation of {mb} MB failed:\n{log[-3000:]}")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # max over children waited for so far
    tokens = sum(json.loads(m.read_text())["tokens"] for m in run_dir.glob("data/*/*.tokens/meta.json"))
    stages = dict(re.findall(r"stage (\w+) done in (\d+)s", log))
    disk = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
    subprocess.run(["rm", "-rf", str(run_dir), str(recipe)], check=False)
    return {"mb": mb, "wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall, "tree_peak_rss": peak[0],
            "largest_process_rss": largest, "stages_s": stages, "disk_bytes": disk}


def reader_vs_step(repeats: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench_train import bench_step
    from bts import BTSForCausalLM
    from bts.data.shards import build_shard
    from bts.data.streams import Batcher
    from bts.data.tokenizer import train_bpe

    torch.set_num_threads(1)
    seq, batch, vocab = 128, 8, 2048  # the demo recipe's stitch phase
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    members = []
    for s in range(5):
        torch.manual_seed(s)
        members.append(LlamaForCausalLM(cfg).eval())
    model = BTSForCausalLM.from_members(members[0], members[1:], num_stitches=4)
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    step_s = bench_step(model, ids, repeats, verbose=False)["step"]
    need = batch * seq / step_s

    corpus = make_corpus(8)
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
    tok = train_bpe(texts[:4], vocab)
    with tempfile.TemporaryDirectory() as tmp:
        shard = build_shard(Path(tmp) / "train.tokens", ((t, str(i)) for i, t in enumerate(texts)), tok)
        batcher = Batcher({"a": shard, "b": shard}, {"a": 0.5, "b": 0.5}, seq, batch, seed=0)
        batcher(0)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            for micro in batcher(n):
                pass
            n += 1
        reader = n * batch * seq / (time.perf_counter() - t0)
    return {"step_s": step_s, "step_tok_per_s": need, "reader_tok_per_s": reader, "ratio": reader / need,
            "shard_tokens": len(shard)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--processes", type=int, default=0, help="tokenization processes (0 = up to 8, one per core)")
    ap.add_argument("--repeats", type=int, default=5, help="stitch steps timed (median)")
    ap.add_argument("--skip-reader", action="store_true")
    ap.add_argument("--skip-prepare", action="store_true")
    args = ap.parse_args()
    if not args.skip_reader:
        r = reader_vs_step(args.repeats)
        print(f"reader: {r['reader_tok_per_s']:,.0f} tok/s from the memory map; a demo-size stitch step "
              f"({r['step_s'] * 1e3:.0f} ms for 8×128 tokens) consumes {r['step_tok_per_s']:,.0f} tok/s")
        print(f"KEY reader_over_step={r['ratio']:.1f} (target ≥ {READER_TARGET:.0f}) "
              f"{'OK' if r['ratio'] >= READER_TARGET else 'BELOW TARGET'}")
    if args.skip_prepare:
        return
    rows = []
    for mb in args.sizes_mb:
        p = prepare(mb, args.processes)
        rows.append(p)
        print(f"prepare {mb} MB: {p['tokens']:,} tokens in {p['wall_s']:.0f}s ({p['tok_per_s']:,.0f} tok/s; stages "
              f"{p['stages_s']}); peak {p['tree_peak_rss'] / 1e6:,.0f} MB PSS over the process tree, "
              f"{p['largest_process_rss'] / 1e6:,.0f} MB largest process; {p['disk_bytes'] / 1e6:,.0f} MB on disk")
    peaks = [p["tree_peak_rss"] for p in rows]
    growth = peaks[-1] / peaks[0]
    ok = max(peaks) <= RSS_BOUND
    print(f"KEY peak_rss_max_mb={max(peaks) / 1e6:.0f} (bound {RSS_BOUND / 1e6:.0f}) "
          f"{'OK' if ok else 'OVER BOUND'}; rss_growth={growth:.2f} from {rows[0]['mb']} MB to {rows[-1]['mb']} MB "
          f"of text ({rows[-1]['mb'] / rows[0]['mb']:.0f}× the corpus)")


if __name__ == "__main__":
    main()
