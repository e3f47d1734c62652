"""P4: peak memory of one stitch-training step against its floor, fp32 and bf16 members (CPU).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_memory.py [--threads 1]

Each configuration (members in float32, then bfloat16; stitches always fp32) runs in a fresh subprocess, so one
cannot inherit the other's allocations. There the model is built, two warm-up steps run (the first allocates Adam's
moments), and then one step exactly as bts.train.loop runs it (forward with labels, backward, clip_grad_norm_, AdamW over
the stitch parameters, zero_grad(set_to_none=True)) is measured three ways:

* Peak (the figure used): torch.profiler(profile_memory=True) reports every CPU tensor allocation and free made
  inside the profiled step with the running total of bytes allocated since profiling began ("Total Allocated").
  Its maximum is the step's transient peak; the peak of the step is that plus the bytes resident before it, which
  are counted exactly (unique storages of the model's parameters and buffers, and the optimizer's state).
  This counts tensor bytes only, from torch's own CPU allocator, so it is exact and unaffected by the Python heap,
  libraries, or glibc keeping freed pages (which make RSS-based peaks noisy).
* Cross-check: the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs just before
  the step) minus VmRSS before it. The workers run with MALLOC_MMAP_THRESHOLD_=65536, so glibc maps every tensor
  over 64 KiB on its own and returns it to the system when freed; otherwise freed blocks stay resident in the heap
  and are reused, and the RSS rise says little. Page granularity and small allocations keep it slightly off.
* Activations kept for backward: torch.autograd.graph.saved_tensors_hooks sees every tensor autograd saves; unique
  storages that are not parameters are summed and attributed to the module that saved them (member block, stitch,
  or final norm / LM head / loss). Blocks before the first stitch that changes their stream must save nothing.

Floor = member weights + stitch parameters + AdamW's two moments (all resident between steps) + the activations
kept for backward (all alive when backward starts). The stitch gradients are not added: they are allocated during
backward while activations are being freed, so they need not coexist with all of them. What a step needs beyond
the floor are temporaries (a block's intermediates, the logits' gradient, the stitch gradients).

After the measured step's backward, the bytes of .grad and of optimizer state attached to member parameters are
counted: both must be 0 (tests/train/test_performance.py asserts the same).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import add_model_arguments, make_members  # noqa: E402
from bench_train import graph_layout  # noqa: E402

from bts import BTSForCausalLM  # noqa: E402
from bts.train.config import TrainConfig  # noqa: E402
from bts.train.loop import make_optimizer  # noqa: E402

MB = 2**20


def storage_bytes(tensors) -> int:
    """Bytes of the unique storages behind these tensors (tied or viewed tensors are counted once)."""
    seen = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _proc_status() -> dict:
    text = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class SavedActivations:
    """Sum the unique non-parameter storages autograd saves, per label of the module running when they are saved."""

    def __init__(self, model: BTSForCausalLM):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.seen: dict[int, str] = {}
        self.by_label: dict[str, int] = {}
        self.label = "embed"
        self.handles = []
        names = ["hub"] + [f"expert{m + 1}" for m in range(len(model.experts))]
        decoders = [model.hub.model, *model.experts]
        for name, dec in zip(names, decoders):
            for i, layer in enumerate(dec.layers):
                self._tag(layer, f"{name} block {i + 1}", after="between")
        for k, stitch in enumerate(model.stitches):
            self._tag(stitch, f"stitch {k + 1}", after="between")
        self._tag(model.hub.model.norm, "head+loss", after="head+loss")

    def _tag(self, module, label: str, after: str) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda *_: setattr(self, "label", label)))
        self.handles.append(module.register_forward_hook(lambda *_: setattr(self, "label", after)))

    def pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in self.params and ptr not in self.seen:
            self.seen[ptr] = self.label
            self.by_label[self.label] = self.by_label.get(self.label, 0) + s.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    members = make_members(args.experts, args.hidden, args.layers, args.vocab, ff=int(8 * args.hidden / 3) // 64 * 64)
    # Cast before stitching, as if loaded from disk in this dtype: from_members(..., dtype=) applies to members
    # given as directories or hub ids, not to models already in memory.
    members = [m.to(dtype) for m in members]
    model = BTSForCausalLM.from_members(members[0], members[1:], num_stitches=args.stitches)
    if args.checkpoint_members:
        model.set_execution(checkpoint_members=True)
    del members  # only the model's references remain
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    trainable = dict(model.stitches.named_parameters())
    params = list(trainable.values())
    optimizer = make_optimizer(trainable, TrainConfig(lr=1e-3))
    stitch_ids = {id(p) for p in params}
    member_params = [p for m in model.members() for p in m.parameters()]

    def step(on_backward=None, mark=lambda name: torch.profiler.record_function(name)):
        model.train()
        with mark("bts_forward"):
            loss = model(ids, labels=ids).loss
        with mark("bts_backward"):
            loss.backward()
        if on_backward is not None:
            on_backward()
        with mark("bts_optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step(), step()  # warm-up: Adam's moments exist from the first step on
    counts = {}

    def count_grads():
        counts["member_grad_bytes"] = storage_bytes(p.grad for p in member_params)
        counts["stitch_grad_bytes"] = storage_bytes(p.grad for p in params)

    saved = SavedActivations(model)
    with saved.hooks():
        step(count_grads)
    saved.remove()
    state = optimizer.state
    counts["member_optim_bytes"] = storage_bytes(v for p in member_params if p in state
                                                 for v in state[p].values() if torch.is_tensor(v))
    counts["member_params_in_optimizer"] = sum(id(p) not in stitch_ids for g in optimizer.param_groups
                                               for p in g["params"])
    counts["stitch_optim_bytes"] = storage_bytes(v for p in params for v in state[p].values()
                                                 if torch.is_tensor(v) and v.dim() > 0)

    resident = storage_bytes([*model.parameters(), *model.buffers(),
                              *(v for s in state.values() for v in s.values() if torch.is_tensor(v))])
    before = _proc_status()
    hwm_ok = _reset_hwm()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    after = _proc_status()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    mem = [(e["ts"], e["args"]["Total Allocated"]) for e in events
           if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    peak_ts, transient = max(mem, key=lambda x: x[1])
    phases = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events
              if e.get("name", "").startswith("bts_") and e.get("ph") == "X"}
    peak_phase = next((k[4:] for k, (a, b) in phases.items() if a <= peak_ts <= b), "between phases")

    weights = storage_bytes(member_params)
    stitch = storage_bytes(params)
    activations = sum(saved.by_label.values())
    floor = weights + stitch + counts["stitch_optim_bytes"] + activations
    unused_heads = storage_bytes(e.lm_head.weight for e in model._expert_models)
    lay = graph_layout(model)  # blocks up to these numbers record no graph, so must keep nothing for backward
    no_graph = {"hub": lay["layers"] - lay["hub_graph"], "expert": lay["expert_runs"] - lay["expert_graph"]}
    counts["no_graph_block_bytes"] = sum(
        v for k, v in saved.by_label.items()
        if " block " in k and int(k.split()[-1]) <= no_graph["hub" if k.startswith("hub") else "expert"])
    return {"dtype": args.dtype, "member_weight_bytes": weights, "stitch_param_bytes": stitch,
            "saved_activation_bytes": activations, "saved_by_label": saved.by_label, "floor_bytes": floor,
            "resident_before_bytes": resident, "transient_peak_bytes": transient, "peak_bytes": resident + transient,
            "peak_phase": peak_phase, "rss_rise_bytes": after["VmHWM"] - before["VmRSS"] if hwm_ok else None,
            "unused_expert_head_bytes": unused_heads, **counts}


def report(r: dict) -> None:
    mb = lambda b: f"{b / MB:8.1f} MB"  # noqa: E731
    print(f"members {r['dtype']}:")
    print(f"  member weights            {mb(r['member_weight_bytes'])}")
    print(f"  stitch params/grads/AdamW {mb(r['stitch_param_bytes'])} {mb(r['stitch_grad_bytes'])} "
          f"{mb(r['stitch_optim_bytes'])}")
    print(f"  activations kept for bwd  {mb(r['saved_activation_bytes'])}")
    print(f"  floor                     {mb(r['floor_bytes'])} (weights, stitch params, AdamW moments, activations)")
    print(f"  peak of the step          {mb(r['peak_bytes'])} = resident {mb(r['resident_before_bytes']).strip()} + "
          f"transient {mb(r['transient_peak_bytes']).strip()} (reached during {r['peak_phase']}); "
          f"peak/floor {r['peak_bytes'] / r['floor_bytes']:.3f}")
    if r["rss_rise_bytes"] is not None:
        print(f"  cross-check: RSS high-water rise during the step {mb(r['rss_rise_bytes']).strip()} "
              f"(profiler transient {mb(r['transient_peak_bytes']).strip()})")
    print(f"  member .grad bytes {r['member_grad_bytes']}, member optimizer-state bytes {r['member_optim_bytes']}, "
          f"member tensors in the optimizer {r['member_params_in_optimizer']}; activations kept by blocks with "
          f"no graph {r['no_graph_block_bytes']} bytes")
    saved = r["saved_by_label"]
    rows = sorted(saved.items(), key=lambda kv: -kv[1])
    print("  activations kept for backward by where they were saved: "
          + ", ".join(f"{k} {v / MB:.1f}" for k, v in rows) + " (MB)")
    if r["unused_expert_head_bytes"]:
        print(f"  not counted: {r['unused_expert_head_bytes'] / MB:.1f} MB of expert LM heads the model keeps "
              "referenced (BTSForCausalLM._expert_models) but never uses")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap)
    ap.add_argument("--stitches", type=int, default=4)
    ap.add_argument("--checkpoint-members", action="store_true",
                    help="recompute member blocks in backward instead of keeping their activations")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args()
    if args.dtype:
        print("RESULT " + json.dumps(worker(args)))
        return
    flags = [a for a in sys.argv[1:]]
    results = {}
    # A fixed mmap threshold: glibc then maps every tensor over 64 KiB on its own and unmaps it when freed, so the
    # RSS cross-check sees tensors come and go (by default freed blocks are kept in the heap and reused).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    for dtype in ("float32", "bfloat16"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *flags, "--dtype", dtype],
                              capture_output=True, text=True, check=True, env=env)
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        results[dtype] = json.loads(line[len("RESULT "):])
    remat = ", member blocks checkpointed" if args.checkpoint_members else ""
    print(f"n={args.experts} experts, d={args.hidden}, L={args.layers}, vocab {args.vocab}, batch {args.batch} x "
          f"seq {args.seq}, {args.stitches} stitches{remat}; one stitch-training step, each dtype in a fresh process")
    for r in results.values():
        report(r)
    f32, b16 = results["float32"], results["bfloat16"]
    member_grad = max(r["member_grad_bytes"] + r["member_optim_bytes"] for r in results.values())
    print(f"bf16 members: weights x{b16['member_weight_bytes'] / f32['member_weight_bytes']:.3f}, "
          f"activations x{b16['saved_activation_bytes'] / f32['saved_activation_bytes']:.3f}, "
          f"peak x{b16['peak_bytes'] / f32['peak_bytes']:.3f} of fp32")
    print(f"KEY peak_over_floor={f32['peak_bytes'] / f32['floor_bytes']:.3f} "
          f"bf16_peak_over_floor={b16['peak_bytes'] / b16['floor_bytes']:.3f} "
          f"bf16_weight_ratio={b16['member_weight_bytes'] / f32['member_weight_bytes']:.3f} "
          f"bf16_peak_ratio={b16['peak_bytes'] / f32['peak_bytes']:.3f} member_grad_bytes={member_grad} "
          f"peak_mb={f32['peak_bytes'] / MB:.1f} floor_mb={f32['floor_bytes'] / MB:.1f}")


if __name__ == "__main__":
    main()
