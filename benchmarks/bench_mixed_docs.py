"""What the natural mixed-document sets add to the evaluate stage, measured side by side on a finished run
directory: per method, the time to score the pure domains + the switching text (what evaluate did before) and
the time to score the mixed-document sets; plus preparing the sets (fingerprinting the training splits,
tokenizing) once.

    PYTHONPATH=src python benchmarks/bench_mixed_docs.py RUN_DIR
"""

from __future__ import annotations

import sys
import time

from bts.data.streams import eval_windows
from bts.eval.heldout import heldout_loss
from bts.pipeline import mixed
from bts.pipeline.rundata import load_run_data
from bts.pipeline.stages import methods


def main(run_dir: str) -> None:
    run = load_run_data(run_dir)
    seq, budget = run.recipe.data.seq_len, run.recipe.data.eval_tokens
    windows = {d: eval_windows(run.stream(d, "heldout"), seq, budget) for d in run.domains}
    windows["mixed"] = eval_windows(run.mixed_heldout(), seq)
    t0 = time.perf_counter()
    docs = mixed.mixed_windows(run)
    prepare = time.perf_counter() - t0
    print(f"prepare + tokenize the sets: {prepare:.2f}s (cached data/mixed: reading + tokenizing only)")
    old_total = new_total = 0.0
    for name, (load, _) in methods(run).items():
        model, _ = load()
        t0 = time.perf_counter()
        for w in windows.values():
            heldout_loss(model, w)
        t1 = time.perf_counter()
        for w in docs.values():
            heldout_loss(model, w)
        t2 = time.perf_counter()
        old_total, new_total = old_total + t1 - t0, new_total + t2 - t1
        print(f"{name:<18} before {t1 - t0:6.2f}s  mixed-doc sets {t2 - t1:6.2f}s")
    print(f"all methods: before {old_total:.1f}s, added {new_total:.1f}s ({new_total / old_total:.2f}x the "
          f"scoring before; {sum(w.numel() for w in docs.values())} vs "
          f"{sum(w.numel() for w in windows.values())} tokens)")


if __name__ == "__main__":
    main(sys.argv[1])
