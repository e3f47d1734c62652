"""Members and stitched models read straight onto a device: an explicit CPU changes nothing, a GPU that torch
reports is really asked for (never a silent CPU), and Hugging Face style device maps name one device."""

import pytest
import torch

from bts.core import device as dev
from bts.core.members import load_causal_lm
from bts.core.model import BTSForCausalLM
from bts.errors import BTSError
from helpers import fake_gpus, tiny_members

CUDA_MISSING = "Torch not compiled with CUDA enabled"  # what a CPU build of torch says when CUDA is really used



@pytest.fixture(scope="module")
def member_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    hub, experts = tiny_members(n=2)
    paths = []
    for name, model in (("hub", hub), ("e1", experts[0]), ("e2", experts[1])):
        model.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths


def test_explicit_cpu_is_what_loading_did_before(member_dirs):
    hub, e1, e2 = member_dirs
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # random stitches (init "default"), the same draw for both, so every member matters
    before = BTSForCausalLM.from_members(hub, [e1, e2], num_stitches=2, init="default").eval()
    torch.manual_seed(0)
    on_cpu = BTSForCausalLM.from_members(hub, [e1, e2], num_stitches=2, init="default", device="cpu",
                                         dtype=torch.float32).eval()
    assert not torch.equal(before.stitches[0].gate.weight, torch.zeros_like(before.stitches[0].gate.weight))
    assert all(p.device.type == "cpu" for p in on_cpu.parameters())
    with torch.no_grad():
        assert torch.equal(before(input_ids=ids).logits, on_cpu(input_ids=ids).logits)


def test_saved_model_loads_onto_the_cpu_map(member_dirs, tmp_path):
    hub, e1, _ = member_dirs
    BTSForCausalLM.from_members(hub, [e1], num_stitches=2).save_pretrained(tmp_path / "s")
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(1))
    plain = BTSForCausalLM.from_pretrained(tmp_path / "s")
    for device_map in ("cpu", {"": "cpu"}, torch.device("cpu")):
        mapped = BTSForCausalLM.from_pretrained(tmp_path / "s", device_map=device_map)
        with torch.no_grad():
            assert torch.equal(plain(input_ids=ids).logits, mapped(input_ids=ids).logits)
        assert all(p.dtype == torch.float32 for p in mapped.stitch_parameters())


def test_members_in_bf16_keep_fp32_stitches(member_dirs):
    hub, e1, _ = member_dirs
    model = BTSForCausalLM.from_members(hub, [e1], num_stitches=2, dtype=torch.bfloat16, device="cpu")
    assert next(model.hub.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.stitch_parameters())


def test_a_reported_gpu_is_really_used_for_members(monkeypatch, member_dirs):
    """With a GPU reported, members are read onto it: on this CPU-only torch that fails with torch's own CUDA
    error (named in the one-sentence refusal), which shows nothing quietly stayed on the CPU."""
    hub, e1, _ = member_dirs
    fake_gpus(monkeypatch)
    with pytest.raises(BTSError, match=CUDA_MISSING) as exc:
        load_causal_lm(hub, "hub", device=dev.resolve_device("auto"))
    assert "could not be loaded" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(BTSError, match=CUDA_MISSING):
        BTSForCausalLM.from_members(hub, [e1], num_stitches=2, device="cuda")


def test_a_reported_gpu_is_really_used_for_a_saved_model(monkeypatch, member_dirs, tmp_path):
    hub, e1, _ = member_dirs
    BTSForCausalLM.from_members(hub, [e1], num_stitches=2).save_pretrained(tmp_path / "s")
    fake_gpus(monkeypatch)
    for device_map in ("cuda", 0, {"": "cuda:0"}, "auto"):
        with pytest.raises(BTSError, match=CUDA_MISSING):
            BTSForCausalLM.from_pretrained(tmp_path / "s", device_map=device_map)


def test_device_maps_name_one_device(monkeypatch):
    assert dev.device_from_map(None) is None
    assert dev.device_from_map({"": "cpu", "lm_head": "cpu"}) == torch.device("cpu")
    with pytest.raises(BTSError, match="device_map must put the whole model on one device"):
        dev.device_from_map({"model": "cpu", "lm_head": "cuda:0"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BTSError, match="device_map is 'cuda:0' but torch .* sees no CUDA GPU"):
        dev.device_from_map(0)


def test_load_kwargs_only_for_an_accelerator():
    assert dev.load_kwargs(None) == {} and dev.load_kwargs("cpu") == {}
    assert dev.load_kwargs(torch.device("cuda", 1)) == {"device_map": torch.device("cuda", 1)}


def test_autocast_dtype_per_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert dev.autocast_dtype("auto", cpu) is None and dev.autocast_dtype("auto", gpu) is torch.bfloat16
    assert dev.autocast_dtype("float32", gpu) is None and dev.autocast_dtype("bfloat16", cpu) is torch.bfloat16
    with pytest.raises(BTSError, match="train dtype must be one of auto, float32, bfloat16"):
        dev.autocast_dtype("float16", cpu)
