"""Recipes: one typed dataclass tree, loaded from YAML, checked on load, overridable with dotted `key=value`.

    recipe = load_recipe("demo", overrides=["stitch.train.steps=200"])

A recipe is data: values are parsed with yaml.safe_load, never evaluated. Unknown keys, wrong types and invalid
values are refused with one sentence naming the dotted key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bts.baselines.base import positive
from bts.baselines.registry import REGISTRY
from bts.core.calibrate import check_calibration
from bts.core.device import TRAIN_DTYPES, check_device_spec, check_members_dtype
from bts.core.stitch import check_stitch_layout, check_stitch_options
from bts.errors import BTSError
from bts.train.config import TrainConfig
from bts.train.lora import DEFAULT_TARGETS, LR_SCALE, check_targets


@dataclass
class DomainSpec:
    """Where a domain's text comes from: a built-in corpus, committed fixtures, local files or an HF dataset."""

    source: str = "builtin"  # builtin | fixture | files | hf
    files: list = field(default_factory=list)  # for source=files: paths or globs (txt, jsonl, parquet)
    dataset: str = ""  # for source=hf: dataset name
    config: str = ""
    split: str = "train"
    text_field: str = "text"
    group_field: str = ""  # documents sharing a group never straddle train/held-out
    max_chars: int = 2_000_000
    max_tokens: int = 0  # training tokens kept from this domain (0 = all), next to max_chars
    streaming: bool = False  # for source=hf: read the dataset as it arrives instead of from the local cache


@dataclass
class DataConfig:
    domains: dict = field(default_factory=dict)  # name -> DomainSpec
    seq_len: int = 128
    split_fractions: list = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train / val / held-out, by group
    # the group split's own seed, apart from the recipe's `seed`: runs that differ only in `seed` (the paper recipe's
    # repeats) score the same held-out text, and the demo holds out what the bundled seed never saw
    split_seed: int = 0
    eval_tokens: int = 32768  # held-out tokens scored per domain (0 = all)
    pack: bool = True  # training windows span documents, EOS-separated (as in pretraining); false: one per window
    processes: int = 0  # tokenization processes (0 = up to 8, one per core); the shards do not depend on it
    # natural mixed-document held-out sets (bts.data.mixed, docs/mixed.md): builtin | fixture | off; auto: fixture
    # when every domain is a fixture, builtin when any domain is built in, else off
    mixed_docs: str = "auto"


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    train_chars: int = 3_000_000  # characters of the training mix used to learn the BPE merges


@dataclass
class SeedConfig:
    path: str = ""  # an HF dir or cached hub id; empty: pretrain a tiny Llama from scratch
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    domain_weights: dict = field(default_factory=dict)  # domain -> weight in the seed's mix; empty: equal
    val_tokens: int = 0  # > 0: validation loss per domain on this many tokens at every log step (the seed's curve)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class LoraConfig:
    """LoRA continued pretraining for experts (bts.train.lora, docs/lora.md): r = 0 is off (full training)."""

    r: int = 0  # adapter rank; 0: train the experts' weights in full
    alpha: float = 16.0  # adapters add (alpha / r) · B A to each target's weight
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))  # module names, as peft matches them
    lr: float = 0.0  # peak lr of a LoRA expert; 0: LR_SCALE × experts.train.lr (measured: docs/lora.md)
    # True: the embeddings and LM head also train, in full, at the LoRA lr (experts.train_embeddings is for full
    # training only). Off by default: measured, it specialises more but forgets far more (docs/lora.md).
    train_embeddings: bool = False


@dataclass
class ExpertsConfig:
    domains: list = field(default_factory=list)  # empty: one expert per data domain
    # domain -> a model folder or cached hub id: that expert is used as it is (referenced, not copied), not trained
    paths: dict = field(default_factory=dict)
    # False: continue pretraining the transformer blocks only, keeping the seed's embeddings and LM head. BTS never
    # uses an expert's head, so what an expert learns there is lost to the stitched model (docs/ablations.md).
    # Full training only: LoRA experts have their own switch, experts.lora.train_embeddings.
    train_embeddings: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def train_config(self) -> TrainConfig:
        """The experts' training settings, with the LoRA learning rate when LoRA is on."""
        if not self.lora.r:
            return self.train
        return dataclasses.replace(self.train, lr=self.lora.lr or LR_SCALE * self.train.lr)


@dataclass
class StitchConfig:
    num_stitches: int = 4
    positions: list = field(default_factory=list)  # 1-indexed blocks; empty: evenly spaced
    all_e2h: bool = False
    init: str = "blend"  # blend | bias | mixturekit | default | lstsq (bts.core.stitch, docs/ablations.md)
    init_batches: int = 4  # lstsq: W_proj fitted on this many batches of the stitch mix (bts.core.calibrate)
    init_ridge: float = 0.0  # lstsq: ridge towards W_proj = I, relative to the streams' scale (0: least squares)
    beta: float = 8.0
    gate_dropout: float = 0.0
    expert_stream: str = "raw"
    output: str = "hub"  # hub (the paper) | mix_hidden | mix_logprobs: also the experts' norms and heads
    checkpoint_members: bool = False  # recompute member blocks in backward: less memory, ~one more forward
    general_weight: float = 0.55  # share of the mix drawn from the general (seed-pretraining) data
    domain_weights: dict = field(default_factory=dict)  # domain -> weight of the rest; empty: equal
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class BaselinesConfig:
    """Baselines of the paper (bts.baselines.registry). Trained ones use the stitch's datamix, steps and batch size."""

    methods: list = field(default_factory=list)  # soup, task_arithmetic, ties, dare, btx_*, bam*, btm, routing
    merge_lambda: float = 1.0  # λ of task arithmetic and DARE
    ties_density: float = 0.2
    dare_drop_rate: float = 0.5
    sweep: bool = False  # choose λ / density on the validation split (never on held-out)
    btx_lr: float = 1e-3
    btx_trainable: str = "full"  # full (BTX's finetune) | router
    routing_lr: float = 5e-4  # constant, as in the paper
    bam_lr: float = 1e-3  # BAM trains every weight, as BTX does: BTX's lr (docs/bam.md)
    bam_adapters_lr: float = 1e-3  # routers + identity-initialised adapters: BTX's too (docs/bam.md: measured)
    bam_parallel: bool = True  # BAM's parallel block; false: the members' own sequential block (docs/bam.md)


@dataclass
class DownstreamConfig:
    """Downstream tasks scored for every method (bts.eval.downstream): see `bts eval --help` for the task names."""

    tasks: list = field(default_factory=list)  # empty: skip the stage
    limit: int = 0  # items per task (0 = all)
    fewshot: int = 0
    fixtures: bool = False  # score the small committed slices instead of the full sets (no download)


@dataclass
class ModularityConfig:
    """The modularity measurement (bts.pipeline.modularity, docs/modularity.md), a pipeline stage after the stitch: add the
    last expert, remove each, gates per domain and at domain switches, sparse inference."""

    enabled: bool = False
    add_fraction: float = 0.25  # steps to add the last expert, as a fraction of stitch.train.steps
    retrain_fraction: float = 0.25  # steps of retraining after removing an expert, as the same fraction
    focus_weight: float = 0.5  # share of the added expert's own domain in its training mix
    sparse: bool = True  # also score sparse inference: the top-k experts only, for k = 1..n


@dataclass
class Recipe:
    name: str = "custom"
    seed: int = 0
    run_dir: str = ""  # empty: runs/<name>
    device: str = "auto"  # auto | cpu | cuda | cuda:N, for every stage (docs/gpu.md); resolved when the run starts
    members_dtype: str = "auto"  # frozen members and evaluated models: auto (bf16 on a GPU, fp32 on a CPU) | float32 | ...
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seed_model: SeedConfig = field(default_factory=SeedConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    stitch: StitchConfig = field(default_factory=StitchConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    modularity: ModularityConfig = field(default_factory=ModularityConfig)

    @property
    def expert_domains(self) -> list[str]:
        return list(self.experts.domains) or list(self.data.domains)


# ---- loading -----------------------------------------------------------------------------------------------
def _build(cls, raw: Any, where: str):
    """Build dataclass `cls` from a plain dict, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise BTSError(f"{where or 'recipe'} must be a mapping (got {type(raw).__name__} {raw!r}).")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise BTSError(f"unknown recipe key '{dotted}'{hint}.")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, where)
    if where.endswith("data.domains"):
        if not isinstance(value, dict):
            raise BTSError(f"{where} must map domain names to sources (got {value!r}).")
        return {str(k): _build(DomainSpec, v or {}, f"{where}.{k}") for k, v in value.items()}
    if where.endswith("data.mixed_docs") and value is False:
        return "off"  # YAML 1.1 reads a bare `off` as false
    expected = {int: int, float: (int, float), str: str, bool: bool, list: list, dict: dict}.get(hint)
    if expected is None:
        return value
    if hint is int and isinstance(value, bool) or hint is float and isinstance(value, bool):
        raise BTSError(f"{where} must be a number (got {value!r}).")
    if hint is float and isinstance(value, str) and FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; every user means the number
    if not isinstance(value, expected):
        raise BTSError(f"{where} must be of type {hint.__name__} (got {value!r}).")
    return float(value) if hint is float else value


FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check(recipe: Recipe) -> None:
    """Every value of the recipe, once, in the order of the sections: one sentence naming the dotted key.
    Types were checked by _build; what a lower layer already checks is asked of it (stitch options:
    bts.core.stitch.check_stitch_options; baseline options: each baseline's check, bts.baselines.registry)."""
    if not SAFE_NAME.fullmatch(recipe.name):  # names become folder names (runs/<name>): nothing may climb out
        raise BTSError(f"name '{recipe.name}' must be letters, digits, '_', '-' or '.' and not start with '.'.")
    check_device_spec(recipe.device, "device")  # the spelling; whether it exists is asked when the run starts
    check_members_dtype(recipe.members_dtype, "members_dtype")
    _check_data(recipe.data)
    positive(recipe.tokenizer.vocab_size, "tokenizer.vocab_size")
    positive(recipe.tokenizer.train_chars, "tokenizer.train_chars")
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        positive(getattr(recipe.seed_model, name), f"seed_model.{name}")
    seed = recipe.seed_model
    if not seed.path and seed.hidden_size % seed.num_heads:
        raise BTSError(f"seed_model.hidden_size ({seed.hidden_size}) must be a multiple of seed_model.num_heads "
                       f"({seed.num_heads}).")
    if not seed.path and seed.num_heads % seed.num_kv_heads:
        raise BTSError(f"seed_model.num_heads ({seed.num_heads}) must be a multiple of seed_model.num_kv_heads "
                       f"({seed.num_kv_heads}).")
    for where, t in (("seed_model.train", seed.train), ("experts.train", recipe.experts.train),
                     ("stitch.train", recipe.stitch.train)):
        _check_train(t, where)
    _known_once(recipe.experts.domains, recipe.data.domains, "experts.domains", "in data.domains")
    _check_expert_paths(recipe)
    _check_lora(recipe)
    _check_stitch(recipe)
    b = recipe.baselines
    _known_once(b.methods, REGISTRY, "baselines.methods", "a baseline")
    for baseline in REGISTRY.values():  # every option, whether or not its method runs: each value checked at load
        baseline.check(b, prefix="baselines.")
    _check_downstream(recipe.downstream)
    m = recipe.modularity
    for name in ("add_fraction", "retrain_fraction"):
        if not 0 < getattr(m, name) <= 1:  # also refuses nan
            raise BTSError(f"modularity.{name} must be in (0, 1] (got {getattr(m, name)}).")
    if not 0 <= m.focus_weight < 1:
        raise BTSError(f"modularity.focus_weight must be in [0, 1) (got {m.focus_weight}).")
    if m.enabled and len(recipe.expert_domains) < 2:
        raise BTSError(f"modularity.enabled needs at least 2 experts (experts.domains gives "
                       f"{recipe.expert_domains}).")


def _check_expert_paths(recipe: Recipe) -> None:
    """Given experts: of expert domains (whose data still scores them), as paths, next to a given hub. Whether
    they are models that fit the hub is asked when the run starts (bts.pipeline.given.check_recipe_members)."""
    for d, spec in recipe.experts.paths.items():
        if d not in recipe.expert_domains:
            raise BTSError(f"experts.paths names '{d}', which is not an expert domain "
                           f"({', '.join(recipe.expert_domains)}).")
        if not isinstance(spec, str) or not spec.strip():
            raise BTSError(f"experts.paths.{d} must be a model folder or hub id (got {spec!r}).")
    if recipe.experts.paths and not recipe.seed_model.path:
        raise BTSError(f"experts.paths gives the expert '{next(iter(recipe.experts.paths))}' but seed_model.path "
                       "is empty; a given expert needs the hub it was branched from as seed_model.path.")


def _known_once(values: list, known, where: str, what: str) -> None:
    """Every value is one of `known`, and none is named twice."""
    for v in values:
        if v not in known:
            raise BTSError(f"{where} names '{v}', which is not {what} ({', '.join(known)}).")
        if values.count(v) > 1:
            raise BTSError(f"{where} names '{v}' twice.")


def _check_train(t: TrainConfig, where: str) -> None:
    for name in ("steps", "lr", "batch_size", "grad_accum", "log_every", "ckpt_every"):
        positive(getattr(t, name), f"{where}.{name}")
    for name in ("warmup", "weight_decay", "clip"):
        if not 0 <= getattr(t, name) < float("inf"):  # also refuses nan
            raise BTSError(f"{where}.{name} must be ≥ 0 (got {getattr(t, name)}).")
    if not 0 <= t.min_lr_ratio <= 1:
        raise BTSError(f"{where}.min_lr_ratio must be in [0, 1] (got {t.min_lr_ratio}).")
    if t.batch_size % t.grad_accum:
        raise BTSError(f"{where}.batch_size ({t.batch_size}) must be a multiple of grad_accum ({t.grad_accum}).")
    if t.dtype not in TRAIN_DTYPES:
        raise BTSError(f"{where}.dtype must be auto, float32 or bfloat16 (got '{t.dtype}').")
    from bts.train.tracking import check

    check(t.report_to, f"{where}.report_to")


def _check_lora(recipe: Recipe) -> None:
    lo = recipe.experts.lora
    if lo.r < 0:
        raise BTSError(f"experts.lora.r must be ≥ 0 (0 = off: full training) (got {lo.r}).")
    if not 0 < lo.alpha < float("inf"):  # also refuses nan
        raise BTSError(f"experts.lora.alpha must be positive (got {lo.alpha}).")
    if not 0 <= lo.dropout < 1:
        raise BTSError(f"experts.lora.dropout must be in [0, 1) (got {lo.dropout}).")
    if not 0 <= lo.lr < float("inf"):
        raise BTSError(f"experts.lora.lr must be ≥ 0 (0 = {LR_SCALE:g} × experts.train.lr) (got {lo.lr}).")
    if not lo.targets or any(not isinstance(t, str) or not t for t in lo.targets):
        raise BTSError(f"experts.lora.targets must list module names such as q_proj (got {lo.targets!r}).")
    _known_once(lo.targets, lo.targets, "experts.lora.targets", "")
    if lo.r and not recipe.seed_model.path:  # the seed's architecture is known now (a Llama of the recipe's shape)
        from transformers import LlamaConfig

        s = recipe.seed_model
        check_targets(LlamaConfig(vocab_size=8, hidden_size=s.hidden_size, num_hidden_layers=1,
                                  num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
                                  intermediate_size=s.intermediate_size, tie_word_embeddings=False), lo.targets)


def _check_data(data: DataConfig) -> None:
    if not data.domains:
        raise BTSError("data.domains is empty: a recipe needs at least one domain.")
    if isinstance(data.split_seed, bool) or not isinstance(data.split_seed, int):
        raise BTSError(f"data.split_seed must be an integer (got {data.split_seed!r}).")
    for name, spec in data.domains.items():  # names become folder names (data/<domain>, models/expert-<domain>)
        if not SAFE_NAME.fullmatch(name):
            raise BTSError(f"data.domains key '{name}' must be letters, digits, '_', '-' or '.' and not start "
                           "with '.'.")
        where = f"data.domains.{name}"
        if spec.source not in ("builtin", "fixture", "files", "hf"):
            raise BTSError(f"{where}.source must be builtin, fixture, files or hf (got '{spec.source}').")
        if spec.source == "files" and not spec.files:
            raise BTSError(f"{where}.files is empty but source is 'files'.")
        for f in spec.files:
            if not isinstance(f, str) or not f:
                raise BTSError(f"{where}.files must list paths or globs (got {f!r}).")
        if spec.source == "hf" and not spec.dataset:
            raise BTSError(f"{where}.dataset is empty but source is 'hf'.")
        if spec.source == "hf" and not spec.split:
            raise BTSError(f"{where}.split is empty but source is 'hf'.")
        if spec.source in ("files", "hf") and not spec.text_field:
            raise BTSError(f"{where}.text_field is empty but source is '{spec.source}'.")
        if spec.max_chars < 0:
            raise BTSError(f"{where}.max_chars must be ≥ 0 (0 = all) (got {spec.max_chars}).")
        if spec.max_tokens < 0:
            raise BTSError(f"{where}.max_tokens must be ≥ 0 (0 = all) (got {spec.max_tokens}).")
    positive(data.seq_len, "data.seq_len")
    fr = data.split_fractions
    if (len(fr) != 3 or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 for x in fr)
            or fr[0] <= 0 or fr[2] <= 0 or abs(sum(fr) - 1) > 1e-6):
        raise BTSError(f"data.split_fractions must be three non-negative numbers summing to 1, with train and "
                       f"held-out > 0 (got {fr}).")
    if data.eval_tokens < 0:
        raise BTSError(f"data.eval_tokens must be ≥ 0 (0 = all) (got {data.eval_tokens}).")
    if data.processes < 0:
        raise BTSError(f"data.processes must be ≥ 0 (0 = one per core, up to 8) (got {data.processes}).")
    if data.mixed_docs not in ("auto", "builtin", "fixture", "off"):
        raise BTSError(f"data.mixed_docs must be auto, builtin, fixture or off (got {data.mixed_docs!r}).")


def _check_stitch(recipe: Recipe) -> None:
    s = recipe.stitch
    check_stitch_options(init=s.init, expert_stream=s.expert_stream, beta=s.beta, gate_dropout=s.gate_dropout,
                         prefix="stitch.", output=s.output)
    check_calibration(s.init_batches, s.init_ridge)
    positive(s.num_stitches, "stitch.num_stitches")
    if any(not isinstance(p, int) or isinstance(p, bool) for p in s.positions):
        raise BTSError(f"stitch.positions must be block numbers (got {s.positions}).")
    if not recipe.seed_model.path:  # the layer count is known now: refuse a bad layout before any training
        layers = recipe.seed_model.num_layers
        check_stitch_layout(s.positions, s.num_stitches, layers, f"seed_model.num_layers={layers}")
    if not 0 <= s.general_weight < 1:
        raise BTSError(f"stitch.general_weight must be in [0, 1) (got {s.general_weight}).")
    if s.output != "hub" and recipe.modularity.enabled:  # adding / removing experts rebuilds the stitches only
        raise BTSError(f"stitch.output={s.output} cannot be combined with modularity.enabled (adding and removing "
                       "experts supports only stitch.output=hub).")
    _check_weights(recipe, s.domain_weights, "stitch.domain_weights")
    _check_weights(recipe, recipe.seed_model.domain_weights, "seed_model.domain_weights")
    v = recipe.seed_model.val_tokens
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise BTSError(f"seed_model.val_tokens must be a non-negative integer (got {v!r}).")


def _check_weights(recipe: Recipe, weights: dict, key: str) -> None:
    for d, w in weights.items():
        if d not in recipe.data.domains:
            raise BTSError(f"{key} names '{d}', which is not in data.domains.")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf"):
            raise BTSError(f"{key}.{d} must be positive (got {w}).")


def _check_downstream(ds: DownstreamConfig) -> None:
    for name in ("limit", "fewshot"):
        if getattr(ds, name) < 0:
            raise BTSError(f"downstream.{name} must be ≥ 0 (got {getattr(ds, name)}).")
    if ds.tasks:
        from bts.eval.downstream.tasks import TASKS

        _known_once(ds.tasks, TASKS, "downstream.tasks", "a task")


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise BTSError(f"override '{item}' must look like key.sub=value.")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BTSError(f"override '{item}': '{part}' is not a section.")
    node[parts[-1]] = value


def builtin_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("bts.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    """A recipe by built-in name (demo, smoke, …) or YAML path, with dotted overrides applied, checked."""
    raw = read_recipe(name_or_path)
    for item in overrides:  # (a non-mapping file is refused by _build)
        _apply_override(raw, item)
    recipe = _build(Recipe, raw, "")
    _check(recipe)
    return recipe


def read_recipe(name_or_path: str) -> dict:
    """A recipe file's YAML as a dict, unchecked (a study, bts.pipeline.study, is told apart by its keys)."""
    path = Path(name_or_path)
    if name_or_path in builtin_recipes() and not path.is_file():  # names may hold dots (qwen2.5-…)
        text = resources.files("bts.recipes").joinpath(f"{name_or_path}.yaml").read_text()
    elif path.is_file():
        text = path.read_text()
    elif path.parent.name == "recipes" and path.suffix == ".yaml" and path.stem in builtin_recipes():
        text = resources.files("bts.recipes").joinpath(path.name).read_text()  # recipes/<built-in>.yaml, as docs name them
    else:
        raise BTSError(f"recipe '{name_or_path}' is neither a YAML file nor a built-in recipe "
                       f"({', '.join(builtin_recipes())}).")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise BTSError(f"recipe '{name_or_path}' is not valid YAML ({str(exc).splitlines()[0]}).") from None
    return raw


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)

