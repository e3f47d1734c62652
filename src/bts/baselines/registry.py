"""The baselines of the paper, registered by name (recipe `baselines.methods`), in the paper's order. Each method's
file declares its own (the interface: bts.baselines.base.Baseline); this module only collects them.

    REGISTRY["btx_top2"].build(run) -> marker info;  REGISTRY["btx_top2"].load(path, info) -> (model, accounting)

Methods (names as they appear in results.json):
  soup, task_arithmetic, ties, dare     weight merges, no training (bts.baselines.merges); λ / density / drop rate
                                        from the recipe, or, with baselines.sweep, chosen on the *validation* split
  btx_top2, btx_sampled_top1, btx_soft  BTX MoE (bts.baselines.btx), trained on the stitch datamix for the stitch's
                                        steps and batch size (same token budget)
  bam, bam_adapters                     BAM: soft mixtures of attention and FFN experts (bts.baselines.bam), all
                                        weights trained, or members frozen and d x d adapters trained; stitch
                                        datamix, steps and batch size
  btm                                   BTM ensemble, uniform prior, no training (bts.baselines.btm)
  routing                               sequence-level routing (bts.baselines.routing), router trained on the stitch
                                        datamix at a constant learning rate
"""

from __future__ import annotations

from bts.baselines import bam, btm, btx, merges, routing
from bts.baselines.base import Baseline

REGISTRY: dict[str, Baseline] = {b.name: b for b in (*merges.BASELINES, *btx.BASELINES, *bam.BASELINES,
                                                     *btm.BASELINES, *routing.BASELINES)}
METHODS = tuple(REGISTRY)
