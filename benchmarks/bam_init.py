"""BAM and BAM adapters at initialisation, before any training: held-out loss of the parallel and sequential blocks
on a finished run's members (docs/bam.md: in the demo's regime the parallel block starts at 5.509, the sequential
at 2.977, the seed at 2.932).

    python benchmarks/bam_init.py runs/demo
"""

import sys

from bts.baselines.bam import build_bam
from bts.data.streams import eval_windows
from bts.eval.heldout import heldout_loss
from bts.pipeline.rundata import load_run_data


def main(run_dir: str) -> None:
    run = load_run_data(run_dir)
    seed = str(run.model_dir("seed"))
    experts = [str(run.model_dir(f"expert-{d}")) for d in run.recipe.expert_domains]
    windows = {d: eval_windows(run.stream(d, "heldout"), run.recipe.data.seq_len, 4096) for d in run.domains}
    for adapters in (False, True):
        for parallel in (True, False):
            model = build_bam(seed, experts, adapters=adapters, parallel=parallel)
            loss = {d: heldout_loss(model, w) for d, w in windows.items()}
            print(f"adapters={adapters} parallel={parallel} avg {sum(loss.values()) / len(loss):.3f}",
                  {d: round(v, 3) for d, v in loss.items()}, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
