"""The prepared GPU check: random members of Qwen2.5-0.5B's shape (hub + 3 experts, bf16) stitched with K = 4, in
well under 5 minutes on one GPU. One line each for:

  forward     tokens/s of the stitched model against the same members run alone, one after another (time ratio),
              next to the FLOP ratio bts plan predicts;
  train step  one stitch training step (fp32 stitches, bf16 autocast, AdamW on the stitch parameters only) against
              the forward, next to bts plan's FLOP ratio;
  generate    greedy tokens/s with the KV cache, stitched against the hub alone;
  peak memory torch.cuda.max_memory_allocated over the training steps against bts plan's stitch-training estimate
              for the same shape and batch;
and a final summary line. Timings are medians of interleaved repeats after warm-up, with torch.cuda.synchronize
around each.

    python benchmarks/gpu_check.py                 # on a GPU machine (refused in one sentence, exit 2, without one)
    python benchmarks/gpu_check.py --cpu-smoke     # the same code paths, tiny shape, CPU, a few steps (the tests)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bts import BTSError, BTSForCausalLM
from bts.core.device import autocast, enable_fast_kernels, members_dtype, resolve_device
from bts.core.plan import GIB, make_plan
from bts.core.shipped import shipped_dir

EXPERTS, STITCHES = 3, 4


def member_config(smoke: bool):
    """Qwen2.5-0.5B's published shape (src/bts/configs/qwen2.5-0.5b), or a tiny one of the same family."""
    config = AutoConfig.from_pretrained(shipped_dir("Qwen/Qwen2.5-0.5B"))
    if smoke:
        values = {k: v for k, v in config.to_dict().items() if k not in ("layer_types", "architectures", "model_type")}
        values.update(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_window_layers=4, bos_token_id=1,
                      eos_token_id=2)
        config = AutoConfig.for_model("qwen2", **values)
    return config


def build(config, device, dtype):
    """A hub and EXPERTS experts with random weights, made on the device in the members' dtype."""
    members = []
    for seed in range(EXPERTS + 1):
        torch.manual_seed(seed)
        with torch.device(device):
            members.append(AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval())
    model = BTSForCausalLM.from_members(members[0], members[1:], num_stitches=STITCHES).to(device)
    return model, members


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_times(fns: dict, device, warmup: int, repeats: int) -> dict:
    """Median seconds of each fn, measured interleaved (one of each per repeat) after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            timed(fn, device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def check(args):
    """The check's lines, each yielded as soon as it is measured."""
    device = resolve_device("cpu" if args.cpu_smoke else args.device)
    if device.type != "cuda" and not args.cpu_smoke:
        build_kind = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise BTSError(f"gpu_check needs a CUDA GPU but torch ({torch.__version__}, {build_kind}) sees none; run "
                       "it with --cpu-smoke to exercise the same code on the CPU.")
    enable_fast_kernels(device)
    dtype = members_dtype("bfloat16", device)
    smoke = args.cpu_smoke
    batch, seq = (2, 32) if smoke else (args.batch, args.seq)
    warmup, repeats = (1, 2) if smoke else (2, args.repeats)
    new_tokens = 8 if smoke else args.new_tokens
    config = member_config(smoke)
    t0 = time.perf_counter()
    model, members = build(config, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    yield (f"gpu_check: {device} ({name}), torch {torch.__version__}; members {'tiny qwen2' if smoke else 'Qwen2.5-0.5B'}"
             f" shape x{EXPERTS + 1} (hub + {EXPERTS} experts) {str(dtype).removeprefix('torch.')}, K={STITCHES} "
             f"stitches after blocks {model.config.stitch_positions}; batch {batch} x seq {seq}")
    plan = make_plan(config, experts=EXPERTS, gpus=1, seq=seq, micro_batch=batch, stitches=STITCHES,
                     label="qwen2.5-0.5b")
    phase = {p.name: p for p in plan["phases"]}
    seed_ph, stitch_ph = phase["seed pretraining"], phase["stitch training"]
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

    # 1. forward, no grad: the stitched model against each member alone
    fns = {"bts": lambda: model(ids, use_cache=False)}
    fns.update({f"m{i}": (lambda m=m: m(ids, use_cache=False)) for i, m in enumerate(members)})
    with torch.inference_mode():
        t = median_times(fns, device, warmup, repeats)
    alone = sum(t[f"m{i}"] for i in range(len(members)))
    fwd_flops = stitch_ph.flops_members + stitch_ph.flops_stitch + stitch_ph.flops_attention
    alone_flops = (EXPERTS + 1) * (seed_ph.flops_members + seed_ph.flops_attention)
    tokens = batch * seq
    forward_ratio = t["bts"] / alone
    yield (f"forward: bts {tokens / t['bts']:,.0f} tok/s, the {EXPERTS + 1} members alone one after another "
                 f"{tokens / alone:,.0f} tok/s -> time ratio bts/members {forward_ratio:.2f} (plan's FLOP ratio "
                 f"{fwd_flops / alone_flops:.2f})")

    # 2. a stitch training step: fp32 stitches, bf16 autocast, AdamW on the stitch parameters only
    model.train()
    params = model.stitch_parameters()
    assert all(p.dtype == torch.float32 for p in params) and all(not p.requires_grad for p in members[0].parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with autocast(device):
            loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad(), autocast(device):
            model(ids, use_cache=False)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t = median_times({"step": step, "forward": forward}, device, warmup, repeats)
    step_ratio = t["step"] / t["forward"]
    yield (f"train step: {t['step']:.3f} s ({tokens / t['step']:,.0f} tok/s), forward under the same autocast "
                 f"{t['forward']:.3f} s -> step/forward {step_ratio:.2f} (plan's FLOP ratio "
                 f"{stitch_ph.train_flops / fwd_flops:.2f})")
    estimate = stitch_ph.memory["ddp"]["total"]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        memory = f"{peak / GIB:.2f} GiB measured over the training steps, bts plan {estimate / GIB:.2f} GiB -> " \
                 f"measured/plan {peak / estimate:.2f}"
        mem_ratio = f"{peak / estimate:.2f}"
    else:
        memory = f"not measured on {device} (torch.cuda.max_memory_allocated needs a GPU), bts plan " \
                 f"{estimate / GIB:.3f} GiB"
        mem_ratio = "n/a"
    yield (f"peak memory: {memory}")
    model.eval()

    # 3. generate with the KV cache: stitched against the hub alone (skipped when the budget is spent, so the check
    # always ends with its summary inside the time it was given)
    if time.perf_counter() - t0 > args.max_seconds:
        yield f"generate: skipped, {time.perf_counter() - t0:.0f} s spent of --max-seconds {args.max_seconds:g}"
        yield (f"summary: partial in {time.perf_counter() - t0:.0f} s on {device}: forward ratio {forward_ratio:.2f}, "
               f"step/forward {step_ratio:.2f}, generate skipped, peak/plan {mem_ratio}")
        return
    prompt = ids[:1, : min(seq, 128)]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
              pad_token_id=0)
    with torch.inference_mode():
        t = median_times({"bts": lambda: model.generate(prompt, **kw), "hub": lambda: members[0].generate(prompt, **kw)},
                         device, 1, max(1, repeats // 2))
    gen = new_tokens / t["bts"]
    yield (f"generate: bts {gen:.1f} tok/s, hub alone {new_tokens / t['hub']:.1f} tok/s (batch 1, prompt "
                 f"{prompt.shape[1]}, {new_tokens} new tokens, KV cache) -> ratio {t['hub'] / t['bts']:.2f} "
                 f"(1/(n+1) = {1 / (EXPERTS + 1):.2f})")
    yield (f"summary: ok in {time.perf_counter() - t0:.0f} s on {device}: forward ratio {forward_ratio:.2f}, "
                 f"step/forward {step_ratio:.2f}, generate {gen:.1f} tok/s, peak/plan {mem_ratio}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU, a few steps (what the tests run)")
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N (default auto)")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward / step (default 8)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default 5)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated (default 128)")
    p.add_argument("--max-seconds", type=float, default=200.0,
                   help="skip generation when the check has used this much wall time (default 200)")
    args = p.parse_args(argv)
    try:
        for line in check(args):
            print(line, flush=True)
    except BTSError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
