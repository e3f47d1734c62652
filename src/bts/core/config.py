"""`BTSConfig`: the Hugging Face config of a stitched model (model_type "bts").

It nests the members' shared architecture as `base_config` (deliberately not `text_config`: transformers would
then treat the base as the decoder and size the KV cache for one member instead of n+1), the stitch layout, and a
manifest of the members (name, where to load them from, and a hash of their weights).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from bts.core.stitch import stitch_kinds, stitch_positions


@strict
class CompositeConfig(PreTrainedConfig):
    """A model made of several members of one architecture (`base_config`), listed in `members`.

    The fields after `members` are derived from base_config (`derive_from_base`) so that generic HF code — generate's
    KV cache, lm-eval, special tokens — sees the right numbers. Subclasses set model_type, add their own fields and
    say how many members' layers the KV cache holds (`cache_copies`)."""

    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    base_config: dict | PreTrainedConfig | None = None
    members: list | None = None  # [{"name", "path", "sha256"}], hub / seed first
    num_hidden_layers: int | None = None
    layer_types: list | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        kwargs.setdefault("loss_type", "ForCausalLM")
        super().__post_init__(**kwargs)
        self.fill_defaults()
        derive_from_base(self, copies=self.cache_copies())

    def fill_defaults(self) -> None:
        """Subclasses complete their own fields here, before the derived ones are set."""

    def cache_copies(self) -> int:
        raise NotImplementedError


@strict
class BTSConfig(CompositeConfig):
    model_type = "bts"

    num_experts: int = 1
    expert_names: list | None = None
    stitch_positions: list | None = None  # 1-indexed: a stitch after block p
    stitch_kinds: list | None = None  # "e2h" / "h2e", one per position
    stitch_init: str = "blend"
    stitch_beta: float = 8.0
    gate_dropout: float = 0.0
    expert_stream: str = "raw"
    stitch_output: str = "hub"  # hub (the paper) | mix_hidden | mix_logprobs (bts.core.heads)

    def fill_defaults(self) -> None:
        n_layers = self.base_config.num_hidden_layers
        if self.stitch_positions is None:
            self.stitch_positions = stitch_positions(n_layers, min(4, n_layers))
        if self.stitch_kinds is None:
            self.stitch_kinds = stitch_kinds(len(self.stitch_positions))
        if self.expert_names is None:
            self.expert_names = [f"expert{i + 1}" for i in range(self.num_experts)]

    def cache_copies(self) -> int:
        return self.num_experts + 1  # every member's layers hold a KV-cache slot

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # A cache built from this config (generate's) starts with plain layers; the model gives each member's slots
        # that member's own kind (sliding window or full, bts.core.hf.prepare_cache), as members may differ.
        self.layer_types = ["full_attention"] * self.num_hidden_layers


def derive_from_base(config, copies: int) -> None:
    """Set the fields generic HF code reads (generate's KV cache, lm-eval, special tokens) on a composite config
    whose `copies` members all have the architecture of `config.base_config`."""
    base = config.base_config
    n_layers = base.num_hidden_layers
    config.num_hidden_layers = copies * n_layers
    config.layer_types = list(getattr(base, "layer_types", None) or ["full_attention"] * n_layers) * copies
    config.hidden_size = base.hidden_size
    config.vocab_size = base.vocab_size
    config.max_position_embeddings = getattr(base, "max_position_embeddings", None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, key, None) is None and getattr(base, key, None) is not None:
            setattr(config, key, getattr(base, key))
