"""Gate analysis (bts.eval.gates): per-domain tables, per-token weights, the report's heatmap data, the dominant
expert per token and per segment."""

from __future__ import annotations

import json

import torch
from helpers import open_stitches, random_ids, tiny_members

from bts import BTSForCausalLM
from bts.eval.gates import dominant, gate_summary, gate_table, heatmap, last_e2h, segment_dominance, token_gates


def _model(n=2):
    hub, experts = tiny_members("llama", n)
    return open_stitches(BTSForCausalLM.from_members(hub, experts, names=[f"e{i}" for i in range(n)]).eval())


def test_heatmap_is_the_last_e2h_stitch_per_token_and_exact_through_json():
    model = _model()
    ids = random_ids(1, 24)[0]
    data = heatmap(model, ids, [(0, "e0"), (12, "e1")])
    assert data["members"] == ["hub", "e0", "e1"] and data["bounds"] == [[0, "e0"], [12, "e1"]]
    assert data["stitch"] == last_e2h(model) and data["after_block"] == model.config.stitch_positions[data["stitch"]]
    mass = torch.tensor(json.loads(json.dumps(data))["mass"], dtype=torch.float32)
    assert mass.shape == (3, 24)
    assert (mass.sum(0) - 1).abs().max() <= 1e-5  # the blend is folded in: each token's weights sum to 1
    assert torch.equal(mass, token_gates(model, ids)[data["stitch"]].T)


def test_gate_table_and_summary_rows():
    model = _model()
    table = gate_table(model, {"e0": random_ids(3, 8, seed=1), "other": random_ids(2, 8, seed=2)}, batch_size=2)
    assert set(table) == {"e0", "other"}
    for layers in table.values():
        assert list(layers) == [f"after block {model.config.stitch_positions[i]}"
                                for i, k in enumerate(model.config.stitch_kinds) if k == "e2h"]
        for weights in layers.values():
            assert list(weights) == ["hub", "e0", "e1"] and abs(sum(weights.values()) - 1) <= 1e-5
    rows = gate_summary(model, random_ids(1, 8)[0])
    assert [r["kind"] for r in rows] == list(model.config.stitch_kinds) and not model.training


def test_dominant_expert_per_token_and_per_segment():
    model = _model(3)
    ids = random_ids(2, 10)
    dom = dominant(model, ids)
    assert dom.shape == (2, 10) and int(dom.min()) >= 0 and int(dom.max()) < 3
    segments = segment_dominance(model, ids[0], [(0, "e1"), (5, "prose")])
    assert [(s["start"], s["end"]) for s in segments] == [(0, 5), (5, 10)]
    assert segments[0]["own_share"] is not None and segments[1]["own_share"] is None
    assert all(s["dominant"] in ("e0", "e1", "e2") for s in segments)
