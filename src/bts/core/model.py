"""`BTSForCausalLM`: a frozen hub and n frozen experts run in lockstep, joined by trainable stitch layers.

    model = BTSForCausalLM.from_members("seed/", ["code/", "math/"], num_stitches=4)
    model.save_pretrained("stitched/")            # stitch weights + a manifest of the members, nothing else
    model = AutoModelForCausalLM.from_pretrained("stitched/")   # after `import bts`; checks member hashes

Every member runs as itself: its own embeddings (with its family's scale), rotary embedding (its θ and scaling),
masks (its attention types and sliding window) and decoder blocks; after the chosen blocks a stitch layer
(bts.core.stitch) mixes the residual streams. The output is the hub's final norm, LM head and logit scaling /
softcapping applied to the stitched hub stream. One transformers `DynamicCache` holds every member's keys and values:
member m's layer i uses slot m·L + i through a per-forward view (bts.core.hf.MemberCache; the members' modules are
never changed, so a member still runs on its own), and `generate()`, beam search and cache cropping work unchanged.
The context is the smallest `max_position_embeddings` among the members.

Sparse inference (beyond the paper): `model.set_active_experts(["code"])` — or the top-k by gate mass on a prompt,
`model.set_active_experts(model.top_experts(prompt_ids, k=1))` — runs only those experts: the others' blocks,
projections, gate rows and KV cache are skipped, and E→H gates renormalise over the active members.
`set_active_experts(None)` restores the full model. Adding and removing experts: bts.pipeline.modularity.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from bts.core import batched, hf
from bts.atomic import atomic_save_safetensors, atomic_write_json
from bts.core.config import BTSConfig
from bts.core.device import device_from_map
from bts.errors import BTSError
from bts.core.members import (copy_tokenizer, freeze, load_member_set, member_manifest, reload_members,
                              save_member_manifest)
from bts.core.heads import OutputMix
from bts.core.stitch import E2H, StitchLayer, check_stitch_options, stitch_kinds, stitch_positions
from bts.core.runners import BatchedRunner, Checkpointed, LoopRunner, MemberRunner, at_least_fp32

STITCH_WEIGHTS = "stitch.safetensors"
EXECUTIONS = ("auto", "loop", "batched")


class BTSForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = BTSConfig
    base_model_prefix = "bts"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: BTSConfig, hub: nn.Module | None = None, experts: list[nn.Module] | None = None):
        super().__init__(config)
        base = config.base_config
        d, n = base.hidden_size, config.num_experts
        self.stitches = nn.ModuleList(
            StitchLayer(d, n, kind, init=config.stitch_init, beta=config.stitch_beta,
                        gate_dropout=config.gate_dropout, expert_stream=config.expert_stream)
            for kind in config.stitch_kinds
        )
        # Beyond the paper (bts.core.heads): the output also mixes the experts' final norms and LM heads.
        self.output_mix = OutputMix(d, n, config.stitch_output) if config.stitch_output != "hub" else None
        self.post_init()  # before the members are attached: HF's weight init must never touch loaded members
        if hub is None:  # built from a config alone (tests, meta-device planning): random members
            hub = AutoModelForCausalLM.from_config(base)
            experts = [AutoModelForCausalLM.from_config(base) for _ in range(n)]
        self.hub = freeze(hub)
        # Experts keep only their decoder: their LM heads are used only by an output mix.
        self.experts = nn.ModuleList(freeze(hf.decoder_of(e)) for e in experts)
        # The full expert models, kept (as a plain list: not submodules) to write out experts that exist only in
        # memory. An expert loaded from disk is written by copying its files, so without an output mix its LM head
        # is never used: it is dropped to the meta device (no memory) unless it is tied to the embeddings.
        self._expert_models = [freeze(e) for e in experts]
        self.expert_heads = nn.ModuleList(e.lm_head for e in experts) if self.output_mix is not None else None
        for e in self._expert_models if self.output_mix is None else []:
            head = e.lm_head.weight
            if getattr(e, "_bts_source_dir", None) and head.data_ptr() != hf.decoder_of(e).embed_tokens.weight.data_ptr():
                e.lm_head.to("meta")
        self._active: list[int] | None = None  # sparse inference: indices of the experts that run (None: all)
        self._execution = "auto"  # execution paths: see set_execution
        self._checkpoint = False
        self._stacks = batched.StackCache()  # the batched path's stacked blocks, kept between forwards
        self._batchable: dict = {}  # active set -> why those members cannot batch (None: they can)
        self._stitch_precision()
        # The stitched model's context: the smallest among its members (rotary positions past it are garbage).
        context, self._context_member = None, None
        for name, member in zip(self._member_names(), self.members()):
            length = hf.context_length(member.config)
            if length and (context is None or length < context):
                context, self._context_member = length, name
        if context:
            self.config.max_position_embeddings = context
        # Token ids every member can embed: rows past the smallest vocabulary are padding, never produced.
        self._shared_vocab = min(member.config.vocab_size for member in self.members())

    def _member_names(self) -> list[str]:
        if self.config.members and len(self.config.members) == self.config.num_experts + 1:
            return [m["name"] for m in self.config.members]
        return ["hub", *self.config.expert_names]

    def _stitch_precision(self) -> None:
        """Stitch parameters are master weights: fp32 for fp32 and bf16 members, fp64 for fp64 members (so a
        float64 model is float64 end to end, as the hardware-independent tests need)."""
        member = next(self.hub.parameters()).dtype
        self.stitches.to(torch.promote_types(member, torch.float32))
        if self.output_mix is not None:
            self.output_mix.to(torch.promote_types(member, torch.float32))

    def to(self, *args, **kwargs):
        """Moves devices freely but keeps stitch parameters at least fp32 and members in their own dtype."""
        dtype = kwargs.pop("dtype", None) or next((a for a in args if isinstance(a, torch.dtype)), None)
        args = tuple(a for a in args if not isinstance(a, torch.dtype))
        super().to(*args, **kwargs)
        if dtype is not None:
            for member in self.members():
                member.to(dtype)
        self._stitch_precision()
        return self

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_members(cls, hub, experts, *, names: list[str] | None = None, hub_name: str = "hub",
                     num_stitches: int = 4, positions: list[int] | None = None, all_e2h: bool = False,
                     init: str = "blend", beta: float = 8.0, gate_dropout: float = 0.0,
                     expert_stream: str = "raw", output: str = "hub", dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> "BTSForCausalLM":
        """Build a stitched model. hub / each expert: a model directory, a cached hub id, or a loaded model.
        dtype / device: the members' (read from disk straight onto the device); the stitches stay fp32 or wider.
        output: "hub" (the paper), "mix_hidden" or "mix_logprobs" (also the experts' norms and heads, bts.core.heads)."""
        experts = list(experts) if isinstance(experts, (list, tuple)) else [experts]
        if not experts:
            raise BTSError("experts: at least one expert is needed (n = 0 given).")
        if names is not None and len(names) != len(experts):
            raise BTSError(f"names: {len(names)} names given for {len(experts)} experts.")
        check_stitch_options(init=init, expert_stream=expert_stream, beta=beta, gate_dropout=gate_dropout,
                             output=output)
        members = load_member_set([hub, *experts], [hub_name, *(names or [None] * len(experts))], dtype,
                                  hub_role="hub", device=device)
        hub_model = members[0].model
        base = hub_model.config
        num_layers = base.num_hidden_layers
        if positions is None:
            if not 1 <= num_stitches <= num_layers:
                raise BTSError(f"num_stitches must be between 1 and the {num_layers} layers (got {num_stitches}).")
            positions = stitch_positions(num_layers, num_stitches)
        positions = [int(p) for p in positions]
        if not positions or any(not 1 <= p <= num_layers for p in positions) or positions != sorted(set(positions)):
            raise BTSError(f"positions must be increasing block numbers in 1..{num_layers} (got {positions}).")
        config = BTSConfig(
            base_config=base.to_dict(), num_experts=len(experts), expert_names=[m.name for m in members[1:]],
            stitch_positions=positions, stitch_kinds=stitch_kinds(len(positions), all_e2h), stitch_init=init,
            stitch_beta=beta, gate_dropout=gate_dropout, expert_stream=expert_stream, stitch_output=output,
            members=member_manifest(members),
            bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id,
        )
        config._attn_implementation = hub_model.config._attn_implementation
        model = cls(config, hub=hub_model, experts=[m.model for m in members[1:]])
        return model if device is None else model.to(device)  # the stitches, built on the CPU, join the members

    def _init_weights(self, module):
        if isinstance(module, (StitchLayer, OutputMix)):
            module.reset_parameters()

    def members(self) -> list[nn.Module]:
        return [self.hub, *self.experts]

    def train(self, mode: bool = True):
        super().train(mode)
        for member in self.members():
            member.eval()  # frozen members never run dropout
        return self

    def stitch_parameters(self) -> list[nn.Parameter]:
        return list(self.named_stitch_parameters().values())

    def named_stitch_parameters(self) -> dict[str, nn.Parameter]:
        """Everything trained: the stitch layers and, with an output mix, its gate and blend."""
        named = {f"stitches.{k}": p for k, p in self.stitches.named_parameters()}
        if self.output_mix is not None:
            named.update({f"output_mix.{k}": p for k, p in self.output_mix.named_parameters()})
        return named

    # ---- execution paths ----------------------------------------------------------------------------------
    def set_execution(self, members: str | None = None, *, checkpoint_members: bool | None = None) -> None:
        """How the members run; the outputs are the same every way (tests/core/test_batched.py).

        members: "loop" runs each member's own Hugging Face layers in turn (the reference path). "batched" runs
          block i of every running member as one set of batched matmuls over stacked weights (bts.core.batched); the
          members must share a dtype and device, and their weights become slices of the stacks (no extra copy).
          "auto" (the default) batches only when a KV cache is in use, i.e. in generate(): decode steps are
          small, so dispatch overhead dominates and batching wins (measured 1.9× on the demo model); long
          training and evaluation forwards measured no gain on CPU (docs/performance.md).
        checkpoint_members: in training, keep no activations inside member blocks and stitch layers (only their
          inputs) and recompute them in backward: less memory for long sequences, for about one more forward."""
        if members is not None:
            if members not in EXECUTIONS:
                raise BTSError(f"members must be one of {', '.join(EXECUTIONS)} (got '{members}').")
            why = self._why_not_batched(None) if members == "batched" else None
            if why:
                raise BTSError(f"set_execution('batched'): {why}; use 'loop' (or 'auto', which falls back to it).")
            self._execution, self._stacks = members, batched.StackCache()
        if checkpoint_members is not None:
            self._checkpoint = bool(checkpoint_members)

    @property
    def execution(self) -> dict:
        return {"members": self._execution, "checkpoint_members": self._checkpoint}

    def _why_not_batched(self, active) -> str | None:
        key = tuple(active) if active is not None else None
        if key not in self._batchable:
            running = list(self.experts) if active is None else [self.experts[a] for a in active]
            self._batchable[key] = hf.batchable([hf.decoder_of(self.hub), *running])
        return self._batchable[key]

    def _runner(self, cache, use_cache) -> MemberRunner:
        """This forward's execution path: loop or batched members (set_execution), checkpointed in training.
        "auto" runs on the loop path when the members cannot batch (bts.core.hf.batchable)."""
        kinds, positions = self.config.stitch_kinds, self.config.stitch_positions
        live = max(p for p, k in zip(positions, kinds) if k == E2H) if E2H in kinds else 0  # blocks the experts run
        layers = self.config.base_config.num_hidden_layers
        if self.output_mix is not None:  # the output reads every expert's final stream
            live = layers
        index = list(range(len(self.experts))) if self._active is None else list(self._active)
        decoders = [hf.decoder_of(self.hub), *(self.experts[a] for a in index)]
        slots = [0] + [(a + 1) * layers for a in index]  # expert m's layer i: cache slot (m+1)·L + i
        args = dict(active=self._active, live=live, cache=cache, use_cache=use_cache, slots=slots)
        wants = self._execution == "batched" or (self._execution == "auto" and cache is not None
                                                  and len({next(d.parameters()).dtype for d in decoders}) == 1)
        if live and wants and self._why_not_batched(self._active) is None:
            # The full set shares storage with the members (no extra copy); a subset is a copy of its members.
            blocks = self._stacks.get(decoders, (tuple(self._active or ()), live), live, share=self._active is None)
            runner = BatchedRunner(self.hub.config, decoders, blocks=blocks, **args)
        else:
            runner = LoopRunner(self.hub.config, decoders, **args)
        if self._checkpoint and torch.is_grad_enabled() and cache is None:
            runner = Checkpointed(runner)
        return runner

    def _check_context(self, tokens: int) -> None:
        context = self.config.max_position_embeddings
        if context and tokens > context:  # rotary positions past training are silent garbage
            raise BTSError(f"input of {tokens} tokens is longer than the model's context "
                           f"(max_position_embeddings={context}, set by member '{self._context_member}', the "
                           "shortest among the members); shorten the prompt or max_new_tokens.")

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, return_gates: bool = False, **kwargs):
        """embed → (member blocks → stitch)* → the hub's norm and LM head. How the members run is the runner's
        business (bts.core.runners). return_gates: also each stitch's gates ("effective": its mixing weights)."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("BTSForCausalLM needs input_ids: every member embeds the tokens with its own table.")
        cache = hf.cache_from_kwargs(kwargs)
        if use_cache and cache is None:
            cache = hf.new_cache(self.config)
        hub = hf.decoder_of(self.hub)
        past = cache.get_seq_length() if cache is not None else 0
        self._check_context(past + input_ids.shape[1])
        if self._shared_vocab < max(m.config.vocab_size for m in self.members()) and input_ids.numel() \
                and int(input_ids.max()) >= self._shared_vocab:
            raise BTSError(f"token id {int(input_ids.max())} is outside the vocabulary every member shares "
                           f"({self._shared_vocab} ids).")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0) + past
        runner = self._runner(cache, use_cache)
        states = runner.embed(input_ids, attention_mask, position_ids)
        stitch_after = dict(zip(self.config.stitch_positions, self.stitches))
        gates = []
        for i in range(len(hub.layers)):
            states = runner.block(i, states)
            stitch = stitch_after.get(i + 1)
            if stitch is not None:
                if return_gates:  # from the hub stream the stitch is about to read
                    fn = stitch.mixing_weights if return_gates == "effective" else stitch.gate_values
                    gates.append(fn(at_least_fp32(runner.hub_stream(states)), active=self._active).detach())
                states = runner.stitch(stitch, states)
        if self.output_mix is None:
            hidden = hub.norm(runner.hub_stream(states))
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            logits = hf.lm_logits(self.hub, hidden).float()
        else:
            logits, gates_out = self._mixed_output(runner.streams(states), logits_to_keep, bool(return_gates))
        if self._shared_vocab < logits.shape[-1]:  # the hub's padding rows: never produced
            padding = torch.arange(logits.shape[-1], device=logits.device) >= self._shared_vocab
            logits = logits.masked_fill(padding, torch.finfo(logits.dtype).min)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = hf.causal_lm_output(loss, logits, cache)
        if return_gates:
            out["gates"] = gates  # per stitch layer: [B, T, n+1, d]
            if self.output_mix is not None:
                out["output_gates"] = gates_out.detach()  # [B, T, k+1, d or 1]: each member's output weight
        return out

    def _mixed_output(self, streams: list[torch.Tensor], keep: int, weights: bool):
        """The output mix (bts.core.heads) over the running members' final streams (hub first): each member's own
        final norm and LM head. Returns (float logits, the mixing weights if `weights` else None)."""
        index = list(range(len(self.experts))) if self._active is None else list(self._active)
        if keep:
            streams = [s[:, -keep:] for s in streams]
        normed = [hf.decoder_of(self.hub).norm(streams[0])]
        normed += [self.experts[a].norm(s) for a, s in zip(index, streams[1:])]
        heads = [self.hub.lm_head, *(self.expert_heads[a] for a in index)]
        configs = [self.hub.config, *(self._expert_models[a].config for a in index)]
        if self.output_mix.mode == "mix_logprobs":  # each member's own full forward: its own logit scaling
            heads = [lambda x, h=h, c=c: hf.scale_logits(c, h(x)) for h, c in zip(heads, configs)]
        mix = self.output_mix
        h0 = at_least_fp32(streams[0])
        logits = mix(h0, normed, heads, self._shared_vocab, self.hub.config.vocab_size, active=self._active)
        if mix.mode == "mix_hidden":  # heads are linear: one scaling of the summed logits, as the hub's own
            logits = hf.scale_logits(self.hub.config, logits)
        return logits.float(), mix.mixing_weights(h0, self._active) if weights else None

    @torch.no_grad()
    def gate_values(self, input_ids, attention_mask=None, effective: bool = False) -> list[torch.Tensor]:
        """Every stitch layer's gates for a batch: a list (one per stitch) of [B, T, n+1, d] tensors.
        effective=True folds the blend gate in (StitchLayer.mixing_weights): what each member contributes."""
        mode = "effective" if effective else True
        return self(input_ids=input_ids, attention_mask=attention_mask, return_gates=mode)["gates"]

    # ---- sparse inference ---------------------------------------------------------------------------------
    @property
    def active_experts(self) -> list[str]:
        names = list(self.config.expert_names)
        return names if self._active is None else [names[a] for a in self._active]

    def set_active_experts(self, names: list[str] | None) -> None:
        """Run only these experts from now on (None: all of them). Gates are renormalised over the hub and the
        active experts; the others cost nothing. Change it between generations, not inside one: a KV cache
        holds only the experts that were active when it was filled."""
        if names is None:
            self._active = None
            return
        names = [names] if isinstance(names, str) else list(names)
        known = list(self.config.expert_names)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise BTSError(f"expert '{unknown[0]}' is not in this model (experts: {', '.join(known)}).")
        if not names or len(set(names)) != len(names):
            raise BTSError(f"active experts must be a non-empty list of distinct names (got {names}).")
        idx = sorted(known.index(n) for n in names)
        self._active = None if len(idx) == len(known) else idx

    @torch.no_grad()
    def top_experts(self, input_ids, k: int, attention_mask=None) -> list[str]:
        """The k experts with the most mixing weight (mean over E→H stitches, tokens and channels) on a prompt,
        measured with every expert active; returned in the model's expert order (not by rank)."""
        n = self.config.num_experts
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise BTSError(f"k must be an integer between 1 and the {n} experts (got {k}).")
        saved, self._active = self._active, None
        try:
            gates = self.gate_values(input_ids, attention_mask, effective=True)
        finally:
            self._active = saved
        e2h = [g for g, kind in zip(gates, self.config.stitch_kinds) if kind == E2H]
        mass = torch.stack([g[..., 1:, :].mean(dim=(0, 1, 3)) for g in e2h]).mean(0)  # [n]
        order = torch.argsort(mass, descending=True, stable=True)[:k].tolist()
        return [self.config.expert_names[i] for i in sorted(order)]

    # ---- saving and loading -------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, export_members: bool = False, **_ignored):
        """Write the stitch weights and a manifest of the members. Members are referenced by path and hash;
        with export_members=True (or for members that only exist in memory) they are copied into the folder so
        that it is self-contained."""
        out = Path(save_directory)
        config = self.config.__class__.from_dict(self.config.to_dict())
        config.members = save_member_manifest(self.config.members, [self.hub, *self._expert_models], out,
                                              export_members)  # an export is checked before anything is written
        out.mkdir(parents=True, exist_ok=True)
        config.architectures = [type(self).__name__]
        state = dict(self.stitches.state_dict())
        if self.output_mix is not None:
            state.update({f"output.{k}": v for k, v in self.output_mix.state_dict().items()})
        atomic_save_safetensors(out / STITCH_WEIGHTS, state, metadata={"format": "pt"})
        config.save_pretrained(out)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(out)
        copy_tokenizer(self.config.members[0]["path"], out)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, dtype=None, device_map=None,
                        **kwargs):
        """Load a stitched model saved by `save_pretrained`: re-attach each member (refusing any whose weights
        changed since), then load the stitch weights. device_map: one device (e.g. "cuda", 0), the members read
        straight onto it in `dtype`."""
        device = device_from_map(device_map)
        folder = Path(pretrained_model_name_or_path)
        if not (folder / "config.json").exists():
            raise BTSError(f"'{folder}' is not a saved bts model (no config.json).")
        if not (folder / STITCH_WEIGHTS).exists():
            raise BTSError(f"'{folder}' has no {STITCH_WEIGHTS}; it is not a saved bts model.")
        config = config if isinstance(config, BTSConfig) else BTSConfig.from_pretrained(folder)
        models = reload_members(config, folder, dtype, device)
        config._attn_implementation = models[0].config._attn_implementation
        model = cls(config, hub=models[0], experts=models[1:])
        from safetensors.torch import load_file

        try:
            state = load_file(folder / STITCH_WEIGHTS)
        except Exception as exc:
            raise BTSError(f"'{folder / STITCH_WEIGHTS}' is corrupt or truncated ({exc}).") from None
        for i, stitch in enumerate(model.stitches):  # E→H presence weights exist once an expert was added
            if f"{i}.presence" in state and stitch.kind == E2H:
                stitch.enable_presence()
        output = {k[len("output."):]: state.pop(k) for k in list(state) if k.startswith("output.")}
        missing, unexpected = model.stitches.load_state_dict(state, strict=False)
        if model.output_mix is not None:
            more = model.output_mix.load_state_dict(output, strict=False)
            missing, unexpected = [*missing, *more.missing_keys], [*unexpected, *more.unexpected_keys]
        elif output:
            unexpected = [*unexpected, *output]
        if missing or unexpected:
            raise BTSError(f"'{folder / STITCH_WEIGHTS}' does not match the config "
                           f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}).")
        if device is not None:
            model.to(device)
        model._stitch_precision()
        gen = folder / "generation_config.json"
        if gen.exists():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(folder)
        model.eval()
        return model


AutoConfig.register("bts", BTSConfig)
AutoModelForCausalLM.register(BTSConfig, BTSForCausalLM)
