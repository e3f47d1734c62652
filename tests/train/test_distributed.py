"""Data-parallel training on CPU with gloo, 2 processes: every phase's loss trajectory equals the 1-process run on
the same global batch, and checkpoints move between 1 and 2 processes.

One torch.multiprocessing spawn runs every 2-process scenario (starting processes is the expensive part); the
1-process references run in the test process.

Precision. Two processes sum each gradient in another order than one (two half-batches, then the all-reduce), so
in float32 the trajectories drift apart by amounts that depend on the CPU's kernels (Adam turns the rounding of a
near-cancelling gradient into an update error: 1.44e-5 on a 2-core EPYC). Every model is therefore built in
float64, where the same drift is ~1e-14, and compared at 1e-9 — far below what the property under test produces
when broken (measured: per-rank load-balancing means put BTX's parameters 5e-2 apart, unaveraged DDP gradients put
losses 2e-2 apart, per-rank prefix lengths put the router's weights 6e-4 apart). Stitch layers and BTX routers
follow the members' precision (at least fp32; fp64 here), and `test_phase_runs_in_float64_end_to_end` checks that
no trainable module computes in float32 inside these models. One quantity is not float64 and gets a tolerance
derived from its own precision: the loss values — transformers computes the causal-LM loss in float32 (it casts
the logits with .float()), a mean over the micro-batch's tokens, so two summation orders differ by at most
n·eps32·loss.
"""

import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import VOCAB, tiny_members, tiny_model

from bts import BTSForCausalLM
from bts.train import distributed
from bts.data.streams import Batcher
from bts.errors import BTSError
from bts.train.config import TrainConfig
from bts.train.loop import train

DTYPE = torch.float64
ATOL = 1e-9  # parameters, every phase float64 end to end (measured: <= 2e-14)
MICRO_TOKENS = 2 * 40  # tokens in one micro-batch (batch 4 / grad_accum 2, seq_len 40): the float32 loss mean's n


# ---- the phases: (model, trainable, train kwargs), built identically in every process -------------------------
def members():
    hub, experts = tiny_members("llama", 2, num_hidden_layers=2)
    return hub.to(DTYPE), [e.to(DTYPE) for e in experts]


def plain():
    model = tiny_model("llama", seed=0, num_hidden_layers=2).to(DTYPE)
    return model, dict(model.named_parameters()), {}


def stitched():
    hub, experts = members()
    model = BTSForCausalLM.from_members(hub, experts, num_stitches=2)
    return model, {f"stitches.{k}": p for k, p in model.stitches.named_parameters()}, {}


def btx():
    from bts.baselines.btx import btx_trainable_parameters, build_btx, set_btx_step

    hub, experts = members()
    model = build_btx(hub, experts, routing="top2", seed_rng=0)
    # BTX's load balancing (α = 0.01) is on: its batch means are taken over the global batch, so it matches too.
    assert model.config.router_aux_loss_coef == 0.01
    return model, btx_trainable_parameters(model, "full"), {"step_hook": functools.partial(set_btx_step, model)}


def routing():
    from bts.baselines.routing import RoutedModel, routing_loss_fn

    hub, experts = members()
    model = RoutedModel.from_members([hub, *experts]).to(DTYPE)  # the router too
    return model, {f"router.{k}": p for k, p in model.router.named_parameters()}, {"loss_fn": routing_loss_fn}


def bam(adapters=False):
    from bts.baselines.bam import bam_trainable_parameters, build_bam

    hub, experts = members()
    model = build_bam(hub, experts, adapters=adapters, seed_rng=0)  # the seed's dtype: float64, routers too
    assert next(model.parameters()).dtype == DTYPE
    return model, bam_trainable_parameters(model), {}


PHASES = {"plain": plain, "stitched": stitched, "btx": btx, "routing": routing, "bam": bam,
          "bam_adapters": functools.partial(bam, adapters=True)}
# (phase, mode) pairs trained from scratch in 2 processes
RUNS = [("plain", "ddp"), ("plain", "fsdp2"), ("stitched", "ddp"), ("stitched", "fsdp2"), ("btx", "ddp"),
        ("btx", "fsdp2"), ("routing", "ddp"), ("routing", "fsdp2"), ("bam", "ddp"), ("bam", "fsdp2"),
        ("bam_adapters", "ddp"), ("bam_adapters", "fsdp2")]
# checkpoints across process counts: (phase, mode) for 2 -> 1 and 1 -> 2
MOVES = [("plain", "fsdp2"), ("stitched", "ddp")]


def batcher():
    gen = torch.Generator().manual_seed(0)
    streams = {"a": torch.randint(3, VOCAB, (2000,), generator=gen),
               "b": torch.randint(3, VOCAB, (2000,), generator=gen)}
    # seq_len 40 > 32: the routing phase then draws real prefix lengths t ~ U[32, 256] (clipped to 40)
    return Batcher(streams, {"a": 0.5, "b": 0.5}, seq_len=40, batch_size=4, grad_accum=2, seed=3)


def cfg(steps=4):
    return TrainConfig(steps=steps, lr=1e-2, warmup=1, batch_size=4, grad_accum=2, log_every=1, ckpt_every=2)


def run_phase(phase, out_dir, steps=4, parallel=None):
    model, trainable, kw = PHASES[phase]()
    result = train(model, trainable, batcher(), cfg(steps), out_dir, desc=phase, parallel=parallel, **kw)
    return [loss for _, loss in result.losses], {k: p.detach().clone() for k, p in trainable.items()}


# ---- the 2-process side ------------------------------------------------------------------------------------
def _worker(rank, world, port, root):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init()
    try:
        out = {}
        for phase, mode in RUNS:
            out[(phase, mode)] = run_phase(phase, os.path.join(root, f"dist-{phase}-{mode}"), parallel=mode)
        for phase, mode in MOVES:
            # 2 -> 1: stop after 2 steps (the test resumes in 1 process); 1 -> 2: resume the 1-process checkpoint
            run_phase(phase, os.path.join(root, f"two-then-one-{phase}"), steps=2, parallel=mode)
            out[("resumed", phase)] = run_phase(phase, os.path.join(root, f"one-then-two-{phase}"), parallel=mode)
        if rank == 0:
            torch.save(out, os.path.join(root, "results.pt"))
    finally:
        distributed.cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    for phase, _ in MOVES:
        run_phase(phase, root / f"one-then-two-{phase}", steps=2)  # a 1-process checkpoint at step 2
    mp.spawn(_worker, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    return root, torch.load(root / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    return {phase: run_phase(phase, root / phase) for phase in PHASES}


def float32_islands(phase) -> set[str]:
    """Modules with trainable parameters of their own that hold or return float32 tensors in the float64 model of
    `phase`, seen in one training forward (a cast to float32 inside a float64 model is a float32 island)."""
    model, trainable, kw = PHASES[phase]()
    mine = {id(t) for t in trainable.values()}
    owners = {m for m in model.modules() for p in m.parameters(recurse=False) if id(p) in mine}
    found = {type(m).__name__ for m in owners for p in m.parameters(recurse=False) if p.dtype != DTYPE}

    def floats(out):
        if torch.is_tensor(out):
            return [out] if out.is_floating_point() else []
        items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else []
        return [t for item in items for t in floats(item)]

    def hook(module, args, out):
        if any(t.dtype != DTYPE for t in floats(out)):
            found.add(type(module).__name__)

    handles = [m.register_forward_hook(hook) for m in owners]
    model.train()
    if "step_hook" in kw:
        kw["step_hook"](0)
    with torch.no_grad():
        kw.get("loss_fn", lambda m, b: m(**b).loss)(model, batcher()(0)[0])
    for h in handles:
        h.remove()
    return found


@pytest.fixture(scope="module")
def tolerances(references):
    """phase -> (loss atol, parameter atol), derived from the precision each quantity is computed in."""
    out = {}
    for phase, (losses, tensors) in references.items():
        loss_tol = MICRO_TOKENS * torch.finfo(torch.float32).eps * max(abs(x) for x in losses)
        out[phase] = loss_tol, ATOL
    return out


def _same(a, b, tolerance):
    (losses_a, tensors_a), (losses_b, tensors_b) = a, b
    loss_tol, atol = tolerance
    assert losses_a == pytest.approx(losses_b, abs=loss_tol, rel=0)
    assert tensors_a.keys() == tensors_b.keys()
    for k in tensors_a:
        assert tensors_a[k].dtype == tensors_b[k].dtype, k  # nothing was cast on the way
        torch.testing.assert_close(tensors_a[k], tensors_b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# ---- the tests -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("phase,mode", RUNS)
def test_two_processes_follow_the_one_process_trajectory(two_process, references, tolerances, phase, mode):
    _, results = two_process
    losses, tensors = results[(phase, mode)]
    assert len(losses) == 4 and len(set(losses)) > 1  # it trained
    _same(results[(phase, mode)], references[phase], tolerances[phase])


@pytest.mark.parametrize("phase,mode", MOVES)
def test_checkpoints_move_between_process_counts(two_process, references, tolerances, phase, mode):
    root, results = two_process
    _same(results[("resumed", phase)], references[phase], tolerances[phase])  # 1 -> 2
    resumed = run_phase(phase, root / f"two-then-one-{phase}")  # 2 -> 1
    _same(resumed, references[phase], tolerances[phase])


@pytest.mark.parametrize("phase", PHASES)
def test_phase_runs_in_float64_end_to_end(phase):
    """The float64 models really compute their trainable modules in float64 (a float32 island would bring back
    CPU-dependent rounding at the comparison's scale)."""
    assert float32_islands(phase) == set()


def test_two_process_run_writes_rank0_logs_and_full_checkpoints(two_process):
    root, _ = two_process
    run = root / "dist-plain-fsdp2"
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4  # one line per step, not one per rank
    from safetensors.torch import load_file

    saved = load_file(run / "ckpt" / "step-0000004" / "trainable.safetensors")
    reference, _, _ = plain()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.named_parameters()}


def test_single_process_is_not_distributed():
    assert distributed.init()[:2] == (0, 1) and not distributed.active() and distributed.parallel_mode() is None
    assert not dist.is_initialized()


def test_uneven_batch_split_is_refused():
    batch = {"input_ids": torch.zeros(3, 4, dtype=torch.long), "labels": torch.zeros(3, 4, dtype=torch.long)}
    with pytest.raises(BTSError, match="cannot split evenly"):
        distributed.shard_batch(batch, 0, 2)
    rows = distributed.shard_batch({"input_ids": torch.arange(8).view(4, 2), "other": 5}, 1, 2)
    assert rows["input_ids"].tolist() == [[4, 5], [6, 7]] and rows["other"] == 5


def test_expert_commands_one_per_expert(tmp_path):
    from bts.pipeline.recipe import load_recipe

    recipe = load_recipe("demo")
    lines = distributed.expert_commands("demo", recipe, str(tmp_path), ["stitch.train.steps=5"])
    assert len(lines) == len(recipe.expert_domains)
    for line, d in zip(lines, recipe.expert_domains):
        assert line.startswith("bts run demo stitch.train.steps=5 ") and f"--stages expert:{d} " in line
        assert line.endswith(f"--run-dir {tmp_path}")
