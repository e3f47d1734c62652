"""benchmarks/gpu_check.py cannot rot: its --cpu-smoke runs the same code paths on a tiny shape (as a script, the
way a GPU machine will run it), it refuses a machine without a GPU in one sentence, and with a GPU reported it goes
for CUDA instead of silently staying on the CPU."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PREFIXES = ("gpu_check: ", "forward: ", "train step: ", "peak memory: ", "generate: ", "summary: ok")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_runs_as_a_script_and_prints_one_line_per_measurement():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert [next(p for p in PREFIXES if line.startswith(p)) for line in lines] == list(PREFIXES)
    assert "hub + 3 experts" in lines[0] and "bfloat16" in lines[0]
    # Every measured rate and ratio is a positive number, and the plan's estimate is there.
    for line in lines[1:]:
        numbers = [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*\.?\d*", line)]
        assert numbers and all(x >= 0 for x in numbers)
    assert re.search(r"time ratio bts/members \d+\.\d\d", lines[1])
    assert re.search(r"step/forward \d+\.\d\d \(plan's FLOP ratio \d+\.\d\d\)", lines[2])
    assert re.search(r"bts plan \d+\.\d+ GiB", lines[3])


def test_without_a_gpu_it_refuses_in_one_sentence(capsys):
    module = _module()
    assert module.main([]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: error: gpu_check needs a CUDA GPU") and \
        err[0].endswith("--cpu-smoke to exercise the same code on the CPU.")


def test_with_a_gpu_reported_it_goes_for_cuda(monkeypatch):
    module = _module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    devices = []
    monkeypatch.setattr(module, "enable_fast_kernels", devices.append)
    monkeypatch.setattr("bts.core.device.enable_fast_kernels", lambda device: None)  # no global flags from a test
    monkeypatch.setattr(module, "build", lambda config, device, dtype: (_ for _ in ()).throw(
        RuntimeError(f"built on {device} in {dtype}")))
    with pytest.raises(RuntimeError, match=r"built on cuda:0 in torch.bfloat16"):
        list(module.check(argparse.Namespace(cpu_smoke=False, device="auto", batch=8, seq=1024, repeats=5,
                                             new_tokens=128, max_seconds=200.0)))
    assert [str(d) for d in devices] == ["cuda:0"]

