"""Where the training loop computes: an explicit CPU is bit-identical to the loop before devices, a GPU that torch
reports is really trained on (never a silent CPU), and running out of memory is one sentence."""

import pytest
import torch
from helpers import VOCAB, fake_gpus, tiny_members, tiny_model

from bts import BTSForCausalLM, BTSError
from bts.data.streams import Batcher
from bts.train.config import TrainConfig
from bts.train.loop import train

CUDA_MISSING = "Torch not compiled with CUDA enabled"


def batcher():
    gen = torch.Generator().manual_seed(0)
    streams = {"a": torch.randint(3, VOCAB, (2000,), generator=gen), "b": torch.randint(3, VOCAB, (2000,), generator=gen)}
    return Batcher(streams, {"a": 0.5, "b": 0.5}, seq_len=16, batch_size=4, grad_accum=2, seed=3)


def cfg(**kw):
    return TrainConfig(**{**dict(steps=4, lr=1e-2, warmup=1, batch_size=4, grad_accum=2, log_every=1,
                                 ckpt_every=2), **kw})


def stitched():
    hub, experts = tiny_members("llama", 2)
    return BTSForCausalLM.from_members(hub, experts, num_stitches=2)



def test_explicit_cpu_and_auto_dtype_are_bit_identical_to_before(tmp_path):
    """device unset with dtype float32 (the loop before devices) vs device="cpu" with dtype auto (today's
    default): the same losses to the last bit and the same trained tensors."""
    runs = []
    for i, kwargs in enumerate(({}, {"device": "cpu"}, {"device": torch.device("cpu")})):
        model = stitched()
        trainable = {k: p for k, p in model.stitches.named_parameters()}
        result = train(model, trainable, batcher(), cfg(dtype="float32" if i == 0 else "auto"), tmp_path / str(i),
                       **kwargs)
        runs.append(([loss for _, loss in result.losses], {k: p.detach().clone() for k, p in trainable.items()}))
    for losses, state in runs[1:]:
        assert losses == runs[0][0]
        assert all(torch.equal(state[k], runs[0][1][k]) for k in state)
    assert runs[0][0][0] != runs[0][0][-1]  # it trained


def test_auto_dtype_is_no_autocast_on_the_cpu(tmp_path):
    seen = {}
    for name in ("auto", "bfloat16"):
        model = tiny_model("llama", seed=0, num_hidden_layers=2)
        out = []
        model.lm_head.register_forward_hook(lambda m, args, o: out.append(o.dtype))
        train(model, dict(model.named_parameters()), batcher(), cfg(steps=1, dtype=name), tmp_path / name,
              device="cpu")
        seen[name] = set(out)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights either way
    assert seen == {"auto": {torch.float32}, "bfloat16": {torch.bfloat16}}


@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:0"])
def test_a_reported_gpu_is_trained_on(monkeypatch, tmp_path, device):
    """With a GPU reported, train() moves the model there (torch's CUDA error on this CPU-only build shows the
    attempt); nothing is trained on the CPU instead."""
    fake_gpus(monkeypatch)
    model = tiny_model("llama", seed=0, num_hidden_layers=2)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    with pytest.raises(AssertionError, match=CUDA_MISSING):
        train(model, dict(model.named_parameters()), batcher(), cfg(steps=1), tmp_path, device=device)
    assert all(torch.equal(before[k], p) for k, p in model.named_parameters())
    assert not (tmp_path / "ckpt").exists()


def test_cuda_without_a_gpu_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = tiny_model("llama", seed=0, num_hidden_layers=2)
    with pytest.raises(BTSError, match=r"seed device is 'cuda' but torch .* sees no CUDA GPU") as exc:
        train(model, dict(model.named_parameters()), batcher(), cfg(steps=1), tmp_path / "t", desc="seed",
              device="cuda")
    assert "\n" not in str(exc.value)


def test_out_of_memory_names_the_phase_step_batch_and_what_to_lower(tmp_path):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if len(calls) > 2:  # step 0's two micro-batches fit; step 1's first does not
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return model(**batch).loss

    model = stitched()
    trainable = {k: p for k, p in model.stitches.named_parameters()}
    with pytest.raises(BTSError) as exc:
        train(model, trainable, batcher(), cfg(), tmp_path, desc="stitch", loss_fn=loss_fn, device="cpu")
    text = str(exc.value)
    assert text.startswith("stitch step 1: out of memory on cpu with a batch of 2 micro-batch(es) of 2 x 16 tokens;")
    for hint in ("train.grad_accum", "train.batch_size", "stitch.checkpoint_members", "members_dtype"):
        assert hint in text
    assert "\n" not in text


@pytest.mark.parametrize("device, backend, expected", [
    (torch.device("cpu"), "gloo", torch.device("cpu")),          # a recipe's device=cpu under torchrun
    (torch.device("cuda", 0), "nccl", torch.device("cuda", 1)),  # cuda: this rank's local GPU
    (None, "nccl", torch.device("cuda", 1)),                     # auto with a GPU
])
def test_torchrun_backend_follows_the_device(monkeypatch, device, backend, expected):
    """distributed.init joins with gloo on the CPU and nccl on this rank's GPU, and every later init() (the
    training loop's) returns the device it joined with, so nothing moves back to the CPU."""
    import torch.distributed as dist

    from bts.train import distributed

    fake_gpus(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    joined = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.update(backend=backend, **kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "_joined", {})
    assert distributed.init(device=device) == (1, 2, expected)
    assert joined["backend"] == backend
    assert distributed.init() == (1, 2, expected)  # the loop's call: the joined device, whatever CUDA says
