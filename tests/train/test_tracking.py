"""Experiment tracking (bts.train.tracking): off by default, the same records as metrics.jsonl at the same steps,
W&B offline without network, and a missing package refused in one sentence naming the extra, before anything is
written. The tracker packages are replaced by recording fakes (neither is a dependency of the tests)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from helpers import VOCAB, tiny_members
from bts import BTSForCausalLM
from bts.data.streams import Batcher
from bts.errors import BTSError
from bts.train import tracking
from bts.train.config import TrainConfig
from bts.train.loop import train


@pytest.fixture
def fakes(monkeypatch):
    """Fake `torch.utils.tensorboard` and `wandb` modules that record what they are given."""
    seen = {"tb": [], "wandb": [], "init": {}, "closed": []}

    class SummaryWriter:
        def __init__(self, log_dir):
            seen["tb_dir"] = log_dir

        def add_scalar(self, tag, value, step):
            seen["tb"].append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            seen["closed"].append("tb")

    class Run:
        def log(self, values, step):
            seen["wandb"].append((values, step))

        def finish(self):
            seen["closed"].append("wandb")

    def init(**kw):
        seen["init"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setattr(tracking, "installed", lambda package: True)
    monkeypatch.setattr(tracking, "online", lambda *a, **k: False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return seen


def tiny_run(tmp_path, report_to):
    torch.manual_seed(0)
    hub, experts = tiny_members("llama", 2)
    model = BTSForCausalLM.from_members(hub, experts, num_stitches=1)
    stream = torch.randint(3, VOCAB, (4000,), generator=torch.Generator().manual_seed(0))
    batches = Batcher({"a": stream}, {"a": 1.0}, seq_len=16, batch_size=2)
    cfg = TrainConfig(steps=4, lr=1e-3, warmup=1, batch_size=2, log_every=2, ckpt_every=4, report_to=report_to)
    trainable = dict(model.stitches.named_parameters())
    train(model, trainable, batches, cfg, tmp_path / "stitch", desc="stitch",
          metrics_fn=lambda: {"gates": [{"seed": 0.75, "e0": 0.25}]})
    return [json.loads(x) for x in (tmp_path / "stitch" / "metrics.jsonl").read_text().splitlines()]


def test_trackers_get_the_records_of_metrics_jsonl_at_their_steps(tmp_path, fakes):
    records = tiny_run(tmp_path, ["tensorboard", "wandb"])
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        tb = {tag: v for tag, v, step in fakes["tb"] if step == r["step"]}
        for key in ("loss", "lr", "grad_norm", "tok_per_s", "tokens"):
            assert tb[f"stitch/{key}"] == pytest.approx(r[key], rel=0, abs=0)
        assert tb["stitch/gates/0/e0"] == 0.25
    assert [(v["stitch/loss"], step) for v, step in fakes["wandb"]] == [(r["loss"], r["step"]) for r in records]
    assert fakes["init"]["mode"] == "offline" and fakes["init"]["dir"] == str(tmp_path / "stitch")
    assert fakes["tb_dir"] == str(tmp_path / "stitch" / "tensorboard")
    assert sorted(fakes["closed"]) == ["tb", "wandb"]


def test_tracking_is_off_by_default(tmp_path, fakes):
    assert TrainConfig().report_to == []
    tiny_run(tmp_path, [])
    assert fakes["tb"] == fakes["wandb"] == [] and not (tmp_path / "stitch" / "tensorboard").exists()


def test_a_missing_package_names_the_extra_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "installed", lambda package: False)
    with pytest.raises(BTSError, match=r"^train.report_to includes 'wandb', which needs the wandb package: "
                                       r"pip install 'bts\[wandb\]'\.$"):
        tiny_run(tmp_path, ["wandb"])
    assert not (tmp_path / "stitch").exists()
    with pytest.raises(BTSError, match=r"'mlflow', which is not a tracker \(choose from tensorboard, wandb\)\."):
        tracking.check(["mlflow"])


def test_a_recipe_naming_an_unknown_tracker_is_refused():
    from bts.pipeline.recipe import load_recipe

    with pytest.raises(BTSError, match=r"stitch.train.report_to names 'tb'"):
        load_recipe("smoke", ["stitch.train.report_to=[tb]"])
