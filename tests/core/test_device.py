"""bts.core.device: device and dtype resolution, refusals, and the out-of-memory sentence."""

import pytest
import torch

from bts.core import device as dev
from helpers import fake_gpus
from bts.errors import BTSError



@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:3", " cpu "])
def test_spellings_accepted(spec):
    dev.check_device_spec(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "mps", "", 3, None])
def test_spellings_refused_in_one_line(spec):
    with pytest.raises(BTSError) as exc:
        dev.check_device_spec(spec, "stitch.device")
    assert "stitch.device must be auto, cpu, cuda or cuda:N" in str(exc.value) and "\n" not in str(exc.value)


def test_auto_without_gpu_is_cpu(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device(None) == torch.device("cpu")
    assert dev.members_dtype("auto", torch.device("cpu")) is torch.float32


def test_auto_with_gpu_is_cuda_and_bf16(monkeypatch):
    fake_gpus(monkeypatch, 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    d = dev.resolve_device("auto")
    assert d == torch.device("cuda", 0)
    assert dev.members_dtype("auto", d) is torch.bfloat16
    assert dev.members_dtype("float32", d) is torch.float32


def test_bare_cuda_under_torchrun_is_the_local_gpu(monkeypatch):
    fake_gpus(monkeypatch, 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dev.resolve_device("cuda") == torch.device("cuda", 3)
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_explicit_cpu_stays_cpu_with_a_gpu(monkeypatch):
    fake_gpus(monkeypatch, 1)
    assert dev.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_gpu_refused(monkeypatch, spec):
    fake_gpus(monkeypatch, 0)
    with pytest.raises(BTSError, match=rf"device is '{spec}' but torch .* sees no CUDA GPU"):
        dev.resolve_device(spec)


def test_gpu_index_past_the_last_refused(monkeypatch):
    fake_gpus(monkeypatch, 2)
    with pytest.raises(BTSError, match=r"has 2 CUDA GPU\(s\) \(cuda:0..cuda:1\)"):
        dev.resolve_device("cuda:2")


def test_members_dtype_refused():
    with pytest.raises(BTSError, match="members_dtype must be one of auto, float32, bfloat16, float16"):
        dev.members_dtype("fp8", torch.device("cpu"))


def test_oom_becomes_one_sentence():
    with pytest.raises(BTSError) as exc:
        with dev.oom_guard("stitch step 3", "cuda:0", batch="8 x 512"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    text = str(exc.value)
    assert text.startswith("stitch step 3: out of memory on cuda:0 with a batch of 8 x 512;")
    assert "stitch.checkpoint_members" in text and "members_dtype" in text and "\n" not in text


def test_oom_guard_lets_other_errors_through():
    with pytest.raises(ValueError):
        with dev.oom_guard("x"):
            raise ValueError("not memory")


def test_model_device_skips_meta():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2, device="meta"), torch.nn.Linear(2, 2))
    assert dev.model_device(m) == torch.device("cpu")
