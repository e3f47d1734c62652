"""Capacity planning for a real-size BTS run, from a transformers config alone (the model is built on the meta
device: exact parameter counts for any architecture, no weights read or allocated).

    plan = make_plan("path/to/config.json", experts=3, gpus=8, gpu_mem_gib=80, seq=4096, micro_batch=1)
    print(format_plan(plan))

Memory model per device (bytes per parameter; stated in the output as well):
  weights     2 (bf16) for every parameter the phase holds
  gradients   2 (bf16) for trainable parameters only (frozen members get none)
  optimizer   12 for trainable parameters: AdamW's fp32 master copy + two fp32 moments
  DDP keeps all of it on every device; FSDP2 divides it by the number of devices G and adds the all-gather buffers
  of the two decoder layers in flight (the one running and the prefetched one).
  activations per decoder layer whose backward is needed, without activation checkpointing, flash/SDPA attention
  (no S² term), bf16: 2·B·S·(6·d + 2·kv·hd + 3·f) bytes (norm inputs, q, k, v, attention output, o-proj input,
  residual; gate, up, SiLU·up); plus the logits, B·S·V·6 bytes (bf16 logits + fp32 log-softmax), plus for every
  stitch layer 4·B·S·(n+1)·d·3 bytes (fp32 gate logits, gates, projected states).
FLOPs per token: 2 per matrix weight a token passes (members: blocks + LM head, embeddings are lookups; stitch layers:
(2n+1)·d² weights), plus attention's 2·S·h·hd per layer for a causal average context of S/2. Training costs ≈3× the
forward where weight gradients are needed and ≈2× where only input gradients flow (frozen blocks after a stitch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from bts.errors import BTSError
from bts.core.shipped import SHIPPED_CONFIGS, shipped_dir, shipped_names  # noqa: F401 (re-exported)
from bts.core.stitch import E2H, StitchLayer, stitch_kinds, stitch_positions

GIB = 2**30
WEIGHT_B, GRAD_B, OPTIM_B = 2, 2, 12


@dataclass
class Arch:
    """What the plan needs from a config, counted on a meta-device model."""

    name: str
    layers: int
    d: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    total: int  # parameters of one member
    per_layer: int
    layer_matmul: int  # 2-D weights of one decoder layer
    embed: int
    head: int  # LM-head weights applied per token (V·d even when tied)
    qkv_bias: bool = False  # q/k/v projections with biases (Qwen2)
    qk_norm: bool = False  # per-head q/k RMSNorms (Qwen3)

    @property
    def forward_flops(self) -> int:
        return 2 * (self.layers * self.layer_matmul + self.head)


# Shapes shipped with bts (bts.core.shipped), usable by name or published hub id: `bts plan paper-2.7b --experts 3`
# (the seed docs/method.md §4 reconciles it), `bts plan llama-3.1-8b …`, `bts plan Qwen/Qwen2.5-1.5B …`.


def load_arch(source) -> Arch:
    """An Arch from a model directory, a config.json, a shipped shape's name or hub id, or a transformers config
    object (only the config is read)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        config = source
    else:
        path = Path(source)
        if not path.exists() and shipped_dir(str(source)) is not None:
            path = shipped_dir(str(source))
        if not path.exists():
            raise BTSError(f"CONFIG_OR_MODEL '{source}' is neither a model directory, a config file, a recipe nor a "
                           f"shipped shape ({', '.join(shipped_names())}).")
        if path.is_dir() and not (path / "config.json").exists():
            raise BTSError(f"CONFIG_OR_MODEL '{source}' has no config.json.")
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise BTSError(f"CONFIG_OR_MODEL '{source}' is not a readable transformers config ({exc}).") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = next((m for m in body.modules() if isinstance(m, torch.nn.ModuleList)
                   and len(m) == config.num_hidden_layers), None)
    if layers is None:
        raise BTSError(f"CONFIG_OR_MODEL '{source}': no list of {config.num_hidden_layers} decoder layers found.")
    layer = layers[0]
    d, heads = config.hidden_size, config.num_attention_heads
    embed = model.get_input_embeddings().weight
    head_dim = getattr(config, "head_dim", None) or d // heads
    return Arch(name=config.model_type, layers=config.num_hidden_layers, d=d, ffn=config.intermediate_size,
                heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
                total=sum(p.numel() for p in model.parameters()), per_layer=sum(p.numel() for p in layer.parameters()),
                layer_matmul=sum(p.numel() for p in layer.parameters() if p.dim() == 2),
                embed=embed.numel(), head=embed.shape[0] * d,
                qkv_bias=any(n.endswith("q_proj.bias") for n, _ in layer.named_parameters()),
                qk_norm=any("q_norm" in n for n, _ in layer.named_parameters()))


def bam_counts(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
               num_kv_heads: int, members: int, head_dim: int | None = None, tie_word_embeddings: bool = False,
               qkv_bias: bool = False, qk_norm: bool = False, adapters: bool = False, parallel: bool = True,
               kv_sharing: bool = False) -> dict[str, int]:
    """BAM's parameters in closed form, from architecture numbers alone (bts.baselines.bam builds the model; its
    docstring and docs/bam.md derive the form). members: M = seed + experts. qkv_bias: q/k/v biases (Qwen2);
    qk_norm: per-head q/k norms (Qwen3); adapters: BAM adapters (members frozen, d x d adapters train); parallel:
    one norm per block instead of two; kv_sharing: one K/V per block. Returns {total, trainable, active}."""
    V, d, Fw, L, M = vocab_size, hidden_size, intermediate_size, num_layers, members
    hd = head_dim or d // num_heads
    q = o = d * num_heads * hd
    k = v = d * num_kv_heads * hd
    if qkv_bias:
        q, k, v = q + num_heads * hd, k + num_kv_heads * hd, v + num_kv_heads * hd
    if qk_norm:
        q, k = q + hd, k + hd
    shared = V * d * (1 if tie_word_embeddings else 2) + d + L * d * (1 if parallel else 2)
    attention = M * (q + o) + (1 if kv_sharing else M) * (k + v)
    routers, adapter = L * 2 * M * d, L * M * 2 * d * d if adapters else 0
    total = shared + L * (attention + M * 3 * d * Fw) + routers + adapter
    return {"total": total, "trainable": routers + adapter if adapters else total, "active": total}


def arch_bam_counts(arch: Arch, members: int, **options) -> dict[str, int]:
    """bam_counts for members of shape `arch` (options: adapters, parallel, kv_sharing)."""
    return bam_counts(vocab_size=arch.vocab, hidden_size=arch.d, intermediate_size=arch.ffn, num_layers=arch.layers,
                      num_heads=arch.heads, num_kv_heads=arch.kv_heads, members=members, head_dim=arch.head_dim,
                      tie_word_embeddings=arch.tied, qkv_bias=arch.qkv_bias, qk_norm=arch.qk_norm, **options)


@dataclass
class Phase:
    name: str
    total: int
    trainable: int
    active: int  # parameters a token passes through
    grad_layers: int  # decoder layers (summed over members) whose activations backward needs
    fsdp_unit: int  # parameters of the largest FSDP2 unit (one decoder layer)
    flops_members: int  # forward FLOPs per token, members (without attention)
    flops_stitch: int
    flops_attention: int
    train_flops: int  # per token, forward + backward (0 for inference)
    stitch_layers: int = 0
    kv_cache_layers: int = 0  # inference: decoder layers that keep a KV cache
    memory: dict = field(default_factory=dict)  # "ddp"/"fsdp2" -> {weights, grads, optimizer, activations, total}
    fits: dict = field(default_factory=dict)


def stitch_counts(arch: Arch, n: int, k: int, init: str = "blend") -> tuple[int, int, list[str], list[int]]:
    """(stitch parameters as bts builds them, the paper's (2n+1)·d² per layer, kinds, positions)."""
    kinds, positions = stitch_kinds(k), stitch_positions(arch.layers, k)
    built = 0
    with torch.device("meta"):
        for kind in kinds:
            built += sum(p.numel() for p in StitchLayer(arch.d, n, kind, init=init).parameters())
    return built, k * (2 * n + 1) * arch.d * arch.d, kinds, positions


def make_plan(source, *, experts: int, gpus: int = 8, gpu_mem_gib: float = 80.0, seq: int = 4096,
              micro_batch: int = 1, stitches: int = 4, checkpoint_members: bool = False, label: str = "") -> dict:
    """The plan of every phase for `experts` experts of shape `source` (see load_arch); `label` names the model
    in the output (default: source)."""
    for name, value, low in (("--experts", experts, 1), ("--gpus", gpus, 1), ("--seq", seq, 1),
                             ("--micro-batch", micro_batch, 1), ("--stitches", stitches, 1)):
        if value < low:
            raise BTSError(f"{name} must be at least {low} (got {value}).")
    if gpu_mem_gib <= 0:
        raise BTSError(f"--gpu-mem must be positive (got {gpu_mem_gib}).")
    arch = load_arch(source)
    if stitches > arch.layers:
        raise BTSError(f"--stitches {stitches} is more than the model's {arch.layers} layers.")
    n, L = experts, arch.layers
    built, paper, kinds, positions = stitch_counts(arch, n, stitches)
    last_e2h = max(p for p, kd in zip(positions, kinds) if kd == E2H)
    attn = 2 * seq * arch.heads * arch.head_dim  # per layer per token, causal average context S/2
    fwd = arch.forward_flops
    # A member's parameters on a BTS token path: the hub whole; an expert's embeddings and blocks up to the last
    # E→H (its later blocks and its LM head cannot reach the output and are skipped).
    expert_active = arch.embed + last_e2h * arch.per_layer
    expert_flops = 2 * last_e2h * arch.layer_matmul
    first = positions[0]
    # Backward through the stitched span: every member's blocks after the first stitch (inputs depend on it).
    stitched_grad_layers = (L - first) + n * max(last_e2h - first, 0)
    member_fwd = fwd + n * expert_flops
    stitch_fwd = 2 * paper // 1  # 2 FLOPs per stitch weight (the blend vectors are elementwise)
    stitch_attn = attn * (L + n * last_e2h)
    seed = Phase("seed pretraining", arch.total, arch.total, arch.total, L, arch.per_layer, fwd, 0, attn * L,
                 3 * (fwd + attn * L))
    expert = Phase(f"expert training (x{n} independent jobs)", arch.total, arch.total, arch.total, L, arch.per_layer,
                   fwd, 0, attn * L, 3 * (fwd + attn * L))
    total_bts = (n + 1) * arch.total + built
    # Stitch training: forward everywhere, input gradients through the stitched span, weight gradients only for the
    # stitches (3×); the frozen span before the first stitch runs forward only.
    frac = stitched_grad_layers / max(L + n * last_e2h, 1)
    stitch_train = int((member_fwd + stitch_attn) * (1 + frac)) + 3 * stitch_fwd
    stitch = Phase("stitch training", total_bts, built, arch.total + n * expert_active + built,
                   stitched_grad_layers, arch.per_layer, member_fwd, stitch_fwd, stitch_attn, stitch_train,
                   stitch_layers=stitches)
    infer = Phase("inference (BTS)", total_bts, 0, stitch.active, 0, arch.per_layer, member_fwd, stitch_fwd,
                  stitch_attn, 0, stitch_layers=stitches, kv_cache_layers=L + n * last_e2h)
    phases = [seed, expert, stitch, infer, *bam_phases(arch, n, attn)]
    for ph in phases:
        _memory(ph, arch, n, gpus, seq, micro_batch, gpu_mem_gib, checkpoint_members and ph is stitch)
    return {"source": label or str(source), "arch": arch, "experts": n, "gpus": gpus, "gpu_mem_gib": gpu_mem_gib, "seq": seq,
            "micro_batch": micro_batch, "stitches": stitches, "stitch_positions": positions, "stitch_kinds": kinds,
            "stitch_params": built, "stitch_params_paper": paper, "phases": phases,
            "checkpoint_members": checkpoint_members}


def bam_phases(arch: Arch, n: int, attn: int) -> list[Phase]:
    """Training BAM (every weight) and BAM adapters (routers + adapters; members frozen), seed + n experts as the
    M = n + 1 attention and FFN experts of every block, soft routing (every expert runs: active = total). A BAM
    block holds M members' layers, so activations are kept for L·M layers and the FSDP2 unit is one BAM block."""
    M, L = n + 1, arch.layers
    out = []
    for name, adapters in (("BAM training", False), ("BAM adapters training", True)):
        c = arch_bam_counts(arch, M, adapters=adapters)
        shared = arch.embed * (1 if arch.tied else 2) + arch.d  # embeddings, head, final norm
        extra = L * 2 * M * arch.d + (L * M * 2 * arch.d * arch.d if adapters else 0)  # routers (+ adapters)
        fwd = 2 * (L * M * arch.layer_matmul + arch.head + extra)
        attention = attn * L * M
        # BAM: weight gradients everywhere (3x); adapters: input gradients through the frozen members (2x),
        # weight gradients for routers and adapters (3x).
        train = 3 * (fwd + attention) if not adapters else 2 * (fwd - 2 * extra + attention) + 3 * 2 * extra
        out.append(Phase(name, c["total"], c["trainable"], c["active"], L * M, (c["total"] - shared) // L,
                         fwd, 0, attention, train))
    return out


def activation_bytes_per_layer(arch: Arch, seq: int, batch: int) -> int:
    return 2 * batch * seq * (6 * arch.d + 2 * arch.kv_heads * arch.head_dim + 3 * arch.ffn)


def _memory(ph: Phase, arch: Arch, n: int, gpus: int, seq: int, batch: int, gpu_mem_gib: float,
            checkpointed: bool = False) -> None:
    weights = WEIGHT_B * ph.total
    grads = GRAD_B * ph.trainable
    optim = OPTIM_B * ph.trainable
    if ph.kv_cache_layers:  # inference: KV cache in bf16 instead of activations
        acts = 2 * 2 * ph.kv_cache_layers * arch.kv_heads * arch.head_dim * seq * batch
    elif checkpointed:  # stitch.checkpoint_members: blocks and stitches keep their inputs; one block is recomputed
        acts = ph.grad_layers * 2 * batch * seq * arch.d + activation_bytes_per_layer(arch, seq, batch)
        acts += ph.stitch_layers * 4 * batch * seq * (n + 1) * arch.d + batch * seq * arch.vocab * 6
    else:
        acts = ph.grad_layers * activation_bytes_per_layer(arch, seq, batch) + batch * seq * arch.vocab * 6
        acts += ph.stitch_layers * 4 * batch * seq * (n + 1) * arch.d * 3
    gather = 2 * WEIGHT_B * ph.fsdp_unit  # FSDP2: the running and the prefetched layer, unsharded
    for mode, shard, extra in (("ddp", 1, 0), ("fsdp2", gpus, gather)):
        m = {"weights": weights / shard, "grads": grads / shard, "optimizer": optim / shard, "activations": acts,
             "gather": extra}
        m["total"] = sum(m.values())
        ph.memory[mode] = m
        ph.fits[mode] = m["total"] <= gpu_mem_gib * GIB


# ---- text -----------------------------------------------------------------------------------------------------
def _n(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def _g(b: float) -> str:
    return f"{b / GIB:.1f}"


def format_plan(plan: dict) -> str:
    a: Arch = plan["arch"]
    lines = [f"model: {plan['source']} ({a.name}, L={a.layers}, d={a.d}, ffn={a.ffn}, heads={a.heads}, "
             f"kv_heads={a.kv_heads}, vocab={a.vocab}, {'tied' if a.tied else 'untied'} embeddings): "
             f"{a.total:,} parameters per member",
             f"BTS: {plan['experts']} experts + seed hub, {plan['stitches']} stitch layers after blocks "
             f"{plan['stitch_positions']} ({', '.join(plan['stitch_kinds'])}): {plan['stitch_params']:,} stitch "
             f"parameters as built ({plan['stitch_params_paper']:,} = K·(2n+1)·d² as the paper counts them)",
             f"BAM: seed + {plan['experts']} experts as the attention and FFN experts of every block, soft routing "
             f"(every expert runs), parallel blocks; BAM adapters: members frozen, one d x d adapter per expert "
             f"output trains with the routers",
             f"per device: G={plan['gpus']} devices of {plan['gpu_mem_gib']:g} GiB, micro-batch "
             f"{plan['micro_batch']} x seq {plan['seq']}; bf16 weights/grads, fp32 AdamW master + 2 moments; "
             + ("member blocks and stitches checkpointed in stitch training" if plan.get("checkpoint_members")
                else "no activation checkpointing"), ""]
    head = f"{'phase':<40} {'total':>8} {'trainable':>9} {'active':>8} | {'GFLOP/token fwd':>27} {'train':>7}"
    lines += [head, "-" * len(head)]
    for ph in plan["phases"]:
        fwd = (f"{(ph.flops_members) / 1e9:.2f} members + {ph.flops_stitch / 1e9:.2f} stitch"
               if ph.stitch_layers else f"{ph.flops_members / 1e9:.2f} members")
        lines.append(f"{ph.name:<40} {_n(ph.total):>8} {_n(ph.trainable):>9} {_n(ph.active):>8} | {fwd:>27} "
                     f"{(ph.train_flops / 1e9 if ph.train_flops else 0):>7.2f}")
    attention = plan.get("attention_flops", plan["phases"][0].flops_attention)  # one member's
    lines.append(f"(plus attention {attention / a.layers / 1e9:.3f} GFLOP/token per layer "
                 f"at seq {plan['seq']}; included in the train column)")
    lines += ["", f"{'memory per device, GiB':<40} {'mode':<6} {'weights':>8} {'grads':>7} {'optim':>7} "
              f"{'acts':>7} {'gather':>7} {'total':>8}  fits"]
    for ph in plan["phases"]:
        for mode in ("ddp", "fsdp2"):
            m = ph.memory[mode]
            lines.append(f"{ph.name if mode == 'ddp' else '':<40} {mode:<6} {_g(m['weights']):>8} {_g(m['grads']):>7} "
                         f"{_g(m['optimizer']):>7} {_g(m['activations']):>7} {_g(m['gather']):>7} "
                         f"{_g(m['total']):>8}  {'yes' if ph.fits[mode] else 'NO'}")
    lines.append("(inference: 'acts' is the bf16 KV cache of every running layer; expert blocks after the last E→H "
                 "are skipped)")
    return "\n".join(lines)
