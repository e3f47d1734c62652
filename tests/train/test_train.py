"""The shared training loop: schedule, only-trainable optimisation, resume == uninterrupted, NaN stop."""

import json

import pytest
import torch
from helpers import VOCAB, tiny_members, tiny_model

from bts import BTSForCausalLM, BTSError
from bts.data.streams import Batcher
from bts.train.config import TrainConfig
from bts.train import loop
from bts.train.loop import lr_at, train


def stitched():
    hub, experts = tiny_members("llama", 2)
    return BTSForCausalLM.from_members(hub, experts, num_stitches=2)


def batcher():
    gen = torch.Generator().manual_seed(0)
    streams = {"a": torch.randint(3, VOCAB, (2000,), generator=gen), "b": torch.randint(3, VOCAB, (2000,), generator=gen)}
    return Batcher(streams, {"a": 0.5, "b": 0.5}, seq_len=16, batch_size=4, grad_accum=2, seed=3)


def cfg(**kw):
    base = dict(steps=6, lr=1e-2, warmup=2, batch_size=4, grad_accum=2, log_every=1, ckpt_every=3)
    base.update(kw)
    return TrainConfig(**base)


def test_schedule_warms_up_then_decays_to_floor():
    c = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(100, c) == pytest.approx(0.1)
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(10, 99))


def test_batches_are_a_pure_function_of_the_step():
    b1, b2 = batcher(), batcher()
    assert torch.equal(b1(5)[0]["input_ids"], b2(5)[0]["input_ids"])
    assert not torch.equal(b1(5)[0]["input_ids"], b1(6)[0]["input_ids"])
    assert len(b1(0)) == 2 and b1(0)[0]["input_ids"].shape == (2, 16)


def test_resume_equals_uninterrupted(tmp_path):
    model = stitched()
    trainable = {k: p for k, p in model.stitches.named_parameters()}
    full = train(model, trainable, batcher(), cfg(), tmp_path / "full")
    full_state = {k: p.detach().clone() for k, p in trainable.items()}

    # Interrupted after step 3 (its checkpoint is on disk), then the same call again resumes.
    model2 = stitched()
    trainable2 = {k: p for k, p in model2.stitches.named_parameters()}
    train(model2, trainable2, batcher(), cfg(steps=3), tmp_path / "part")
    ckpt = tmp_path / "part" / "ckpt" / "step-0000003" / "state.json"
    state = json.loads(ckpt.read_text())
    model3 = stitched()  # a fresh process would rebuild the model from scratch
    trainable3 = {k: p for k, p in model3.stitches.named_parameters()}
    resumed = train(model3, trainable3, batcher(), cfg(), tmp_path / "part")
    assert state["step"] == 3
    assert [loss for _, loss in resumed.losses] == [loss for _, loss in full.losses]
    for k in full_state:
        assert torch.equal(full_state[k], trainable3[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated lines after the resume


def test_only_trainable_parameters_change(tmp_path):
    model = stitched()
    members_before = {k: v.clone() for k, v in model.hub.state_dict().items()}
    trainable = {k: p for k, p in model.stitches.named_parameters()}
    before = {k: p.detach().clone() for k, p in trainable.items()}
    train(model, trainable, batcher(), cfg(steps=3), tmp_path)
    assert all(torch.equal(members_before[k], v) for k, v in model.hub.state_dict().items())
    assert any(not torch.equal(before[k], p) for k, p in trainable.items())


def test_damaged_checkpoint_falls_back_to_previous(tmp_path, capsys):
    model = stitched()
    trainable = {k: p for k, p in model.stitches.named_parameters()}
    train(model, trainable, batcher(), cfg(steps=6, ckpt_every=3), tmp_path)
    latest = tmp_path / "ckpt" / "step-0000006" / "trainable.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    model2 = stitched()
    trainable2 = {k: p for k, p in model2.stitches.named_parameters()}
    result = train(model2, trainable2, batcher(), cfg(steps=6, ckpt_every=3), tmp_path)
    assert "damaged" in capsys.readouterr().err
    assert result.steps == 6


def test_non_finite_loss_stops_with_step_number(tmp_path):
    model = stitched()
    trainable = {k: p for k, p in model.stitches.named_parameters()}

    def bad_loss(m, batch):
        loss = m(**batch).loss
        return loss * float("nan") if bad_loss.calls == 2 else (bad_loss.__setattr__("calls", bad_loss.calls + 1) or loss)

    bad_loss.calls = 0
    with pytest.raises(BTSError, match="step 1"):
        train(model, trainable, batcher(), cfg(steps=4, ckpt_every=1), tmp_path, loss_fn=bad_loss)
    assert (tmp_path / "ckpt" / "step-0000001").is_dir()


def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    """compile: true traces the model with TorchDynamo; the "eager" backend keeps the test fast (inductor's code
    generation takes minutes on CPU) while still checking that the captured graphs train exactly like eager."""

    compiled = []
    real = torch.compile

    def eager_backend(model, **kw):
        compiled.append(model)
        return real(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager_backend)
    runs = []
    for name, flag in (("eager", False), ("compiled", True)):
        model = stitched()
        trainable = dict(model.stitches.named_parameters())
        result = train(model, trainable, batcher(), cfg(steps=3, compile=flag), tmp_path / name)
        runs.append([loss for _, loss in result.losses])
    assert len(compiled) == 1
    assert runs[0] == runs[1]  # the eager backend runs the same kernels in the same order: no rounding differs


def test_float64_training_stays_float64(tmp_path, monkeypatch):
    """dtype "float32" means no autocast: a float64 model's forward, gradients and Adam moments stay float64 (the
    hardware-independent trajectory tests of test_distributed.py rest on this). An unknown dtype is refused."""
    model = tiny_model("llama", seed=0, num_hidden_layers=2).to(torch.float64)
    trainable = dict(model.named_parameters())
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    optimizers, real = [], loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda params, c: optimizers.append(real(params, c)) or optimizers[-1])
    loop.train(model, trainable, batcher(), cfg(steps=2), tmp_path)
    assert seen and set(seen) == {torch.float64}
    assert all(p.dtype == torch.float64 for p in trainable.values())
    moments = [t for st in optimizers[0].state.values() for t in st.values() if t.dim()]
    assert moments and all(t.dtype == torch.float64 for t in moments)
    with pytest.raises(BTSError, match="float32, bfloat16"):
        loop.train(model, trainable, batcher(), cfg(steps=1, dtype="float64"), tmp_path / "bad")


def test_a_checkpoint_of_other_shapes_is_one_sentence(tmp_path):
    """Same names, other shapes (a vocabulary changed under the run, say): refused in one sentence, not a
    size-mismatch traceback from deep inside the restore."""
    model = tiny_model("llama")
    trainable = dict(model.named_parameters())
    train(model, trainable, batcher(), cfg(steps=3), tmp_path / "run")
    other = tiny_model("llama", vocab_size=VOCAB + 8)
    with pytest.raises(BTSError, match=r"holds different parameters from this run \(other names or shapes"):
        train(other, dict(other.named_parameters()), batcher(), cfg(), tmp_path / "run")
