"""What the whole-model composites (the BTM ensemble, the routed model) share: frozen members of one architecture,
seed first, behind one Hugging Face model, saved as a config with a manifest of the members (bts.core.members).

    class MyComposite(CompositeModel):               # config_class: a MemberSetConfig subclass
        weights_file = "mine.safetensors"            # its own trained weights, if any (see _save_own / _load_own)
        def __init__(self, config, members=None):
            super().__init__(config)
            ...                                      # its own modules, before the members are attached
            self.attach_members(members)

Also the token helpers both use: batches from dicts / tensors / token lists, positions under left padding, and each
sequence's next-token log-probabilities under one member.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from bts.core.config import CompositeConfig
from bts.core.device import device_from_map
from bts.core.members import Member, freeze, member_manifest, reload_members, save_member_manifest
from bts.errors import BTSError


@strict
class MemberSetConfig(CompositeConfig):
    """A composite whose members each run as a whole model: it only counts them (`num_members`)."""

    num_members: int = 1

    def fill_defaults(self) -> None:
        if self.members is not None:
            self.num_members = len(self.members)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # generate() sizes a cache from this config, which the composites never fill (BTM keeps one cache per member,
        # each of the member's own kind; routing hands decoding to the member): plain layers, so no sliding-window
        # field of the base (Gemma 2/3) is needed here.
        self.layer_types = ["full_attention"] * self.num_hidden_layers


class CompositeModel(PreTrainedModel, GenerationMixin):
    """Frozen members (seed first) behind one model; subclasses add what they own (a prior, a router)."""

    main_input_name = "input_ids"
    _supports_sdpa = True
    kind = "composite model"  # how a folder that is not one is named in errors
    weights_file: str | None = None  # the file of its own weights (None: it has none)

    def __init__(self, config: MemberSetConfig):
        super().__init__(config)
        self.loss_type = "ForCausalLM"  # HF derives it from the class name, which lacks 'ForCausalLM'

    def attach_members(self, members: list[nn.Module] | None) -> None:
        """Called last by a subclass's __init__, after its own modules exist."""
        self.post_init()  # before the members are attached: HF's weight init must never touch loaded members
        n = self.config.num_members
        if members is None:  # from a config alone (tests, planning): random members
            members = [AutoModelForCausalLM.from_config(self.config.base_config) for _ in range(n)]
        if len(members) != n:
            raise BTSError(f"members: {len(members)} models given but the config lists {n}.")
        self.members = nn.ModuleList(freeze(member) for member in members)

    @classmethod
    def config_for(cls, loaded: list[Member], **fields) -> MemberSetConfig:
        """The config of a composite of loaded members (bts.core.members.load_member_set), with its own fields."""
        base = loaded[0].model.config
        config = cls.config_class(base_config=base.to_dict(), members=member_manifest(loaded), **fields,
                                  bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                                  pad_token_id=base.pad_token_id)
        config._attn_implementation = base._attn_implementation
        return config

    def train(self, mode: bool = True):
        super().train(mode)
        for member in self.members:
            member.eval()  # frozen members never run dropout
        return self

    # ---- saving and loading -------------------------------------------------------------------------------------
    def _save_own(self, out: Path, config: MemberSetConfig) -> None:
        """Write what the composite owns besides its members (into `out` or the config to be saved)."""

    def _load_own(self, folder: Path) -> None:
        """Read back what _save_own wrote."""

    def save_pretrained(self, save_directory, export_members: bool = False, **_ignored):
        """Write the config and a manifest of the members (path + weights hash); members that only exist in memory,
        or all with export_members=True, are copied into the folder (bts.core.members.save_member_manifest)."""
        out = Path(save_directory)
        config = self.config.__class__.from_dict(self.config.to_dict())
        config.members = save_member_manifest(self.config.members, list(self.members), out, export_members)
        out.mkdir(parents=True, exist_ok=True)
        config.architectures = [type(self).__name__]
        self._save_own(out, config)
        config.save_pretrained(out)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(out)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, dtype=None, device_map=None,
                        **kwargs):
        """Load a folder written by save_pretrained, refusing members whose weights changed since. device_map: one
        device, the members read straight onto it in `dtype`."""
        device = device_from_map(device_map)
        folder = Path(pretrained_model_name_or_path)
        for name in ("config.json", *([cls.weights_file] if cls.weights_file else [])):
            if not (folder / name).exists():
                raise BTSError(f"'{folder}' is not a saved {cls.kind} (no {name}).")
        config = config if isinstance(config, cls.config_class) else cls.config_class.from_pretrained(folder)
        models = reload_members(config, folder, dtype, device)
        config._attn_implementation = models[0].config._attn_implementation
        model = cls(config, members=models)
        model._load_own(folder)
        if device is not None:
            model.to(device)
        if (folder / "generation_config.json").exists():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model.eval()


# ---- tokens ---------------------------------------------------------------------------------------------------------
def as_batch(batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) from a dict, a tensor or a token list."""
    if isinstance(batch, dict):
        ids = torch.as_tensor(batch["input_ids"])
        mask = batch.get("attention_mask")
    else:
        ids, mask = torch.as_tensor(batch), None
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
    return ids.to(device), mask.to(device)


def positions_from_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Position ids that ignore left padding (as generate derives them), for the last `length` positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


def token_logprobs(model: nn.Module, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x_t | x_<t) for t ≥ 1 ([B, T-1], float64) and which of them are real tokens with a real context."""
    mask = attention_mask.bool()
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=positions_from_mask(attention_mask, input_ids.shape[1])).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logp.double(), mask[:, 1:] & mask[:, :-1]
