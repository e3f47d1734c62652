"""stitch.init=lstsq in the pipeline (the tiny smoke run up to the stitch stage) and in `bts stitch`: W_proj is fitted
before training, a kill mid-stitch then the same command ends bit for bit where an uninterrupted run ends, and bad
calibration settings are refused in one sentence with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, save_tiny_members
from safetensors.torch import load_file

import bts.data
from bts.cli.child import run_cli

LSTSQ = ["stitch.init=lstsq", "stitch.init_batches=2", "baselines.methods=[]"]
STAGES = ["--stages", "data,tokenizer,seed,experts,stitch"]


def smoke(run: Path, log: Path, *extra, fault=None):
    return run_cli(["run", "smoke", *TINY, *LSTSQ, *extra, *STAGES, "--run-dir", str(run)], log, fault=fault)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("lstsq")
    assert smoke(root / "run", root / "log") == 0, (root / "log").read_text()[-3000:]
    return root / "run"


def test_the_stitch_stage_fits_the_projections_before_training(reference):
    marker = json.loads((reference / "stages/stitch.json").read_text())
    # 2 calibration batches of the smoke stitch's batch size (8) × seq_len (64), packed: every token counts
    assert marker["lstsq"]["tokens"] == 2 * 8 * 64
    assert len(marker["lstsq"]["residual"]) == 1 and 0 <= marker["lstsq"]["residual"][0] < 1
    assert any(k.endswith("blend") for k in load_file(reference / "models/bts/stitch.safetensors"))  # as "blend"


def test_kill_mid_stitch_then_rerun_equals_uninterrupted(reference, tmp_path):
    run = tmp_path / "run"
    assert smoke(run, tmp_path / "log", fault="stitch:3") == -9, (tmp_path / "log").read_text()[-2000:]
    assert not (run / "models/bts").exists()
    assert smoke(run, tmp_path / "log") == 0, (tmp_path / "log").read_text()[-2000:]
    a, b = load_file(reference / "models/bts/stitch.safetensors"), load_file(run / "models/bts/stitch.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, key", [("stitch.init_batches=0", "stitch.init_batches"),
                                           ("stitch.init_batches=-2", "stitch.init_batches"),
                                           ("stitch.init_ridge=-1", "stitch.init_ridge")])
def test_bad_calibration_settings_are_refused_before_anything_is_written(tmp_path, override, key):
    log = tmp_path / "log"
    assert run_cli(["run", "smoke", *TINY, *LSTSQ, override, "--run-dir", str(tmp_path / "run")], log) == 2
    text = log.read_text().strip()
    assert text.startswith("bts: error: ") and key in text and "\n" not in text, text
    assert not (tmp_path / "run").exists()


# ---- bts stitch ---------------------------------------------------------------------------------------------------
FIXTURES = Path(bts.data.__file__).parent / "fixtures"
DATA = [str(FIXTURES / "code" / "documents.jsonl")]
SETTINGS = ["stitch.num_stitches=2", "stitch.init=lstsq", "stitch.init_batches=2", "data.seq_len=32",
            "train.batch_size=4", "train.warmup=1", "train.log_every=1", "train.ckpt_every=2"]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    return save_tiny_members(tmp_path_factory.mktemp("members"))


def stitch_argv(members, out, *extra):
    return ["stitch", "--hub", str(members / "hub"), "--experts", str(members / "code"), str(members / "math"),
            "--data", *DATA, "--steps", "4", "--out", str(out), *SETTINGS, *extra]


def test_bts_stitch_fits_then_resumes_bit_for_bit(members, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_cli(stitch_argv(members, whole, "train.lr=1e-12"), tmp_path / "0.txt") == 0, \
        (tmp_path / "0.txt").read_text()
    # at a negligible learning rate the saved W_proj is the fitted one: far from the identity "blend" keeps
    tiny = load_file(whole / "stitch.safetensors")
    eye = torch.eye(32)
    projs = [v for k, v in tiny.items() if k.endswith("proj")]
    assert projs and all((p - eye).abs().max() > 1e-2 for p in projs)
    full = tmp_path / "full"
    assert run_cli(stitch_argv(members, full), tmp_path / "2.txt") == 0, (tmp_path / "2.txt").read_text()
    assert run_cli(stitch_argv(members, cut), tmp_path / "3.txt", fault="stitch:3") == -9
    assert run_cli(stitch_argv(members, cut), tmp_path / "4.txt") == 0, (tmp_path / "4.txt").read_text()
    a, b = load_file(full / "stitch.safetensors"), load_file(cut / "stitch.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bts_stitch_refuses_bad_calibration_settings_writing_nothing(members, tmp_path):
    out = tmp_path / "out"
    assert run_cli(stitch_argv(members, out, "stitch.init_batches=0"), tmp_path / "log") == 2
    text = (tmp_path / "log").read_text().strip()
    assert text.startswith("bts: error: ") and "stitch.init_batches" in text and "\n" not in text, text
    assert not out.exists()
