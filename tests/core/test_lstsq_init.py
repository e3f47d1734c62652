"""stitch.init=lstsq (bts.core.calibrate): each W_proj is the least-squares map between the members' own streams at
its stitch (E→H expert → hub, H→E hub → expert), the stitched model still starts exactly as the hub, no member
weight changes, and the same batches give the same weights. Everything in float64."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids, tiny_members

from bts import BTSError, BTSForCausalLM
from bts.core.calibrate import calibrate_from, calibrate_projections, check_calibration
from bts.core.stitch import E2H, H2E

POSITIONS = [1, 2, 3]  # of 4 blocks: E→H, H→E, E→H; never the last block (HF's last hidden state is normed)


def _members(n=2):
    hub, experts = tiny_members("llama", n)
    return hub.double(), [e.double() for e in experts]


def _model(hub, experts, init="lstsq"):
    return BTSForCausalLM.from_members(hub, experts, positions=POSITIONS, init=init).eval()


def _batches(k=3, b=2, t=12):
    return [{"input_ids": random_ids(b, t, seed=s)} for s in range(k)]


@torch.no_grad()
def _streams(member, batches, p, keep=None):
    """Member's own residual stream after block p over the batches, [tokens, d] (its own HF forward)."""
    rows = []
    for i, batch in enumerate(batches):
        h = member(batch["input_ids"], output_hidden_states=True).hidden_states[p]
        rows.append(h[keep[i]] if keep is not None else h.reshape(-1, h.shape[-1]))
    return torch.cat(rows)


def _expected(hub, experts, batches, keep=None):
    """Per stitch: the [n, d, d] W_proj of torch.linalg.lstsq on the captured streams (ĥ = x @ W^T)."""
    out = []
    for p, kind in zip(POSITIONS, [E2H, H2E, E2H]):
        h0 = _streams(hub, batches, p, keep)
        ws = []
        for e in experts:
            hi = _streams(e, batches, p, keep)
            x, y = (hi, h0) if kind == E2H else (h0, hi)
            ws.append(torch.linalg.lstsq(x, y).solution.T)
        out.append(torch.stack(ws))
    return out


def test_each_projection_is_the_least_squares_map_between_the_members_streams():
    hub, experts = _members()
    model = _model(hub, experts)
    assert [s.kind for s in model.stitches] == [E2H, H2E, E2H]
    batches = _batches()
    info = calibrate_projections(model, batches)
    assert info["tokens"] == 3 * 2 * 12
    for stitch, want in zip(model.stitches, _expected(hub, experts, batches)):
        assert stitch.proj.dtype == torch.float64
        scale = want.abs().max()
        assert (stitch.proj - want).abs().max() <= 1e-8 * scale
        assert not torch.allclose(stitch.proj, torch.eye(32, dtype=torch.float64).expand_as(stitch.proj))
    # least squares beats the identity (the blend start), which is one of its candidates; and fits well
    for p, kind, res in zip(POSITIONS, [E2H, H2E, E2H], info["residual"]):
        h0 = _streams(hub, batches, p)
        ident = []
        for e in experts:
            hi = _streams(e, batches, p)
            x, y = (hi, h0) if kind == E2H else (h0, hi)
            ident.append(float(((x - y) ** 2).sum() / (y ** 2).sum()))
        assert 0 <= res <= sum(ident) / len(ident)


@torch.no_grad()
def test_after_calibration_the_model_is_still_the_hub_and_members_are_untouched():
    hub, experts = _members(3)
    model = _model(hub, experts)
    before = {f"{i}.{k}": v.clone() for i, m in enumerate([hub, *experts]) for k, v in m.state_dict().items()}
    calibrate_projections(model, _batches())
    after = {f"{i}.{k}": v for i, m in enumerate([hub, *experts]) for k, v in m.state_dict().items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for stitch in model.stitches:  # everything but W_proj is as "blend" starts
        assert not stitch.gate.weight.any() and not stitch.blend.any()
    ids = random_ids(seed=9)
    assert torch.equal(model(ids).logits, hub(ids).logits.float())  # the hub stream passes every stitch exactly


def test_the_same_batches_give_the_same_weights_and_other_batches_other_weights():
    hub, experts = _members()
    w = []
    for batches in (_batches(), _batches(), _batches(k=4)):
        model = _model(hub, experts)
        calibrate_projections(model, batches)
        w.append([s.proj.clone() for s in model.stitches])
    assert all(torch.equal(a, b) for a, b in zip(w[0], w[1]))
    assert not all(torch.equal(a, b) for a, b in zip(w[0], w[2]))


def test_padding_is_left_out_and_a_batcher_is_drawn_step_by_step():
    hub, experts = _members()
    batches = _batches()
    for batch in batches:  # unpacked batches label their EOS padding -100
        labels = batch["input_ids"].clone()
        labels[:, 9:] = -100
        batch["labels"] = labels
    model = _model(hub, experts)
    info = calibrate_from(model, lambda step: [batches[step]], steps=3)
    assert info["tokens"] == 3 * 2 * 9
    keep = [b["labels"] != -100 for b in batches]
    for stitch, want in zip(model.stitches, _expected(hub, experts, batches, keep)):
        assert (stitch.proj - want).abs().max() <= 1e-8 * want.abs().max()


def test_ridge_shrinks_towards_the_identity():
    hub, experts = _members(1)
    batches = _batches()
    lam = 0.1
    model = _model(hub, experts)
    calibrate_projections(model, batches, ridge=lam)
    p, stitch = POSITIONS[0], model.stitches[0]  # E→H: X = expert stream, Y = hub stream
    x, y = _streams(experts[0], batches, p), _streams(hub, batches, p)
    g = x.T @ x
    s = lam * g.trace() / g.shape[0] * torch.eye(g.shape[0], dtype=g.dtype)
    want = torch.linalg.solve(g + s, x.T @ y + s).T
    assert (stitch.proj[0] - want).abs().max() <= 1e-8 * want.abs().max()
    big = _model(hub, experts)
    calibrate_projections(big, batches, ridge=1e9)
    eye = torch.eye(32, dtype=torch.float64)
    assert (big.stitches[0].proj[0] - eye).abs().max() < 1e-6


def test_calibration_refuses_stitches_that_are_not_at_their_start():
    hub, experts = _members()
    for init in ("bias", "mixturekit", "default"):  # no blend gate: the streams are not the members' own
        with pytest.raises(BTSError, match="at its start"):
            calibrate_projections(_model(hub, experts, init=init), _batches())
    opened = _model(hub, experts)
    with torch.no_grad():
        opened.stitches[1].blend.fill_(0.1)
    with pytest.raises(BTSError, match="at its start"):
        calibrate_projections(opened, _batches())


@pytest.mark.parametrize("batches, ridge, key", [(0, 0.0, "init_batches"), (-1, 0.0, "init_batches"),
                                                 (2.5, 0.0, "init_batches"), (True, 0.0, "init_batches"),
                                                 (4, -1.0, "init_ridge"), (4, float("nan"), "init_ridge"),
                                                 (4, float("inf"), "init_ridge")])
def test_bad_calibration_settings_are_one_sentence(batches, ridge, key):
    with pytest.raises(BTSError, match=f"stitch.{key} must be") as err:
        check_calibration(batches, ridge)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(").")


def test_batched_execution_fits_the_same_projections():
    hub, experts = _members()
    batches = _batches()
    fits = []
    for members in ("loop", "batched"):
        model = _model(hub, experts)
        model.set_execution(members)
        calibrate_projections(model, batches)
        fits.append([s.proj.clone() for s in model.stitches])
    for a, b in zip(*fits):
        assert (a - b).abs().max() <= 1e-8 * a.abs().max()
