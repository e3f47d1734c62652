"""Stitch your own models: train stitch layers over a given hub and experts on given text, and write a stitched model
that `AutoModelForCausalLM.from_pretrained(out)` loads (the `bts stitch` command is a thin layer over this).

    model = stitch_job("Qwen/Qwen2.5-1.5B", ["Qwen/Qwen2.5-Coder-1.5B", "Qwen/Qwen2.5-Math-1.5B"],
                       data=["corpus/*.jsonl"], steps=2000, out="stitched/", overrides=["stitch.num_stitches=4"])

Options are the recipe's own sections, checked as a recipe checks them: `stitch.*` (bts.pipeline.recipe.StitchConfig
without the datamix keys), `train.*` (TrainConfig), `data.seq_len`, `data.text_field`, `data.group_field`,
`data.max_chars` (0, the default here: all the text), `data.max_tokens` (0: all) and `seed`. Everything is
checked before `out` is created: the members cheaply (configs and tokenizer files, bts.pipeline.given), the data
patterns, the options, and `out` itself, which must be new, empty, or a run of this same command (`force` starts
over instead). The training state (job.json, metrics.jsonl, ckpt/) and the text's token shard (text.tokens,
bts.pipeline.stitch_text) live in out/training, so running the same command again resumes from the last checkpoint,
reuses the shard when the sources' fingerprint in job.json is unchanged, and ends bit for bit where an
uninterrupted run ends. A bad document found while tokenizing, or too little text, removes what this run created.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bts.atomic import atomic_write_json
from bts.baselines.base import positive
from bts.core.calibrate import CALIBRATION_SALT, calibrate_from, check_calibration
from bts.core.device import members_dtype as resolve_members_dtype, resolve_device, to_device
from bts.core.members import resolve_dir
from bts.core.stitch import check_stitch_options
from bts.errors import BTSError
from bts.pipeline.given import check_layout, check_members
from bts.pipeline.recipe import DataConfig, DomainSpec, StitchConfig, _apply_override, _build, _check_train
from bts.pipeline.rundir import _first_difference
from bts.pipeline.stitch_text import build_text, fingerprint, open_sources, same_text, total_bytes
from bts.train.config import TrainConfig

SCHEMA = "bts.stitch/1"
STATE = "training"  # out/training: job.json, metrics.jsonl, ckpt/
DATA_KEYS = {"seq_len": DataConfig, "text_field": DomainSpec, "group_field": DomainSpec, "max_chars": DomainSpec,
             "max_tokens": DomainSpec}
SHARD = "text.tokens"  # out/training/text.tokens: all the text, tokenized once (bts.data.shards)
MIX_KEYS = ("general_weight", "domain_weights", "train")  # the pipeline's datamix: not options of one text mix
CALIBRATION_KEYS = ("init_batches", "init_ridge")  # stitch.init=lstsq only
OPTIONS = ("stitch.*, train.*, data.seq_len, data.text_field, data.group_field, data.max_chars, data.max_tokens "
           "or seed")


@dataclasses.dataclass
class JobOptions:
    stitch: StitchConfig
    train: TrainConfig
    data: dict  # seq_len, text_field, group_field, max_chars, max_tokens
    seed: int = 0

    def to_dict(self) -> dict:
        stitch = {k: v for k, v in dataclasses.asdict(self.stitch).items() if k not in MIX_KEYS}
        return {"stitch": stitch, "train": dataclasses.asdict(self.train), "data": self.data, "seed": self.seed}


def parse_options(steps: int, overrides=()) -> JobOptions:
    """The job's options from --steps and key=value overrides, each checked as in a recipe."""
    raw: dict = {"train": {"steps": steps}}
    for item in overrides:
        _apply_override(raw, item)
    for key in raw:
        if key not in ("stitch", "train", "data", "seed"):
            raise BTSError(f"override '{key}' is not a bts stitch option ({OPTIONS}).")
    known = [f.name for f in dataclasses.fields(StitchConfig) if f.name not in MIX_KEYS]
    given = raw.get("stitch") or {}
    for key in given if isinstance(given, dict) else ():
        if key not in known:
            raise BTSError(f"stitch.{key} is not a bts stitch option (stitch options: {', '.join(known)}; training "
                           "settings are train.*).")
    stitch = _build(StitchConfig, raw.get("stitch") or {}, "stitch")
    check_stitch_options(init=stitch.init, expert_stream=stitch.expert_stream, beta=stitch.beta,
                         gate_dropout=stitch.gate_dropout, prefix="stitch.", output=stitch.output)
    check_calibration(stitch.init_batches, stitch.init_ridge)
    positive(stitch.num_stitches, "stitch.num_stitches")
    if any(not isinstance(p, int) or isinstance(p, bool) for p in stitch.positions):
        raise BTSError(f"stitch.positions must be block numbers (got {stitch.positions}).")
    train = _build(TrainConfig, raw["train"], "train")
    _check_train(train, "train")
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise BTSError(f"data must be a section (got {data!r}).")
    for key in data:
        if key not in DATA_KEYS:
            raise BTSError(f"data.{key} is not a bts stitch option ({OPTIONS}).")
    seq_len = _build(DataConfig, {k: v for k, v in data.items() if k == "seq_len"}, "data").seq_len
    positive(seq_len, "data.seq_len")
    spec = _build(DomainSpec, {"max_chars": 0, "max_tokens": 0, **{k: v for k, v in data.items() if k != "seq_len"}},
                  "data")
    if not spec.text_field:
        raise BTSError("data.text_field must name the text column (got '').")
    if spec.max_chars < 0:
        raise BTSError(f"data.max_chars must be ≥ 0 (0 = all) (got {spec.max_chars}).")
    if spec.max_tokens < 0:
        raise BTSError(f"data.max_tokens must be ≥ 0 (0 = all) (got {spec.max_tokens}).")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BTSError(f"seed must be an integer (got {seed!r}).")
    return JobOptions(stitch, train, {"seq_len": seq_len, "text_field": spec.text_field,
                                      "group_field": spec.group_field, "max_chars": spec.max_chars,
                                      "max_tokens": spec.max_tokens}, seed)


# ---- the job ------------------------------------------------------------------------------------------------
def stitch_job(hub: str, experts: list[str], data=(), data_hf=(), *, steps: int, out, overrides=(),
               names: list[str] | None = None, device: str = "auto", members_dtype: str = "auto",
               force: bool = False, export: bool = False):
    """Train the stitches of hub + experts on the text of `data` (files or globs: txt, jsonl, parquet) and
    `data_hf` (HF datasets, NAME[:CONFIG[:SPLIT]], from the local cache), write the stitched model to `out`, and
    return it. Every bad input is a BTSError raised before `out` is created or changed."""
    from bts.core.model import BTSForCausalLM

    opts = parse_options(steps, overrides)
    dev = resolve_device(device, "--device")
    dtype = resolve_members_dtype(members_dtype, dev)  # frozen members: bf16 on a GPU unless told
    names = list(names) if names else [Path(str(e).rstrip("/")).name for e in experts]
    if len(names) != len(experts):
        raise BTSError(f"--names gives {len(names)} names for {len(experts)} experts.")
    if len(set(names)) != len(names) or "hub" in names:
        raise BTSError(f"expert names must be unique and not 'hub' (got {names}); pass --names.")
    check_members(("--hub", hub), {n: ("--experts", e) for n, e in zip(names, experts)})
    check_layout(opts.stitch, hub, "--hub")
    sources = _sources(data, data_hf, opts.data)
    out = Path(out)
    prints = fingerprint(sources)
    # What the result depends on, spelled canonically: the same command typed another way (a trailing slash, a
    # glob the shell expanded, another checkpoint interval) resumes the same run.
    record = {"schema": SCHEMA, "hub": _canonical(hub), "experts": [_canonical(e) for e in experts], "names": names,
              "data": [f[0] for p in prints if "data_hf" not in p for f in p["files"]], "data_hf": list(data_hf),
              "members_dtype": str(dtype).removeprefix("torch."), "options": _result_options(opts.to_dict())}
    previous = _previous_job(out, record, force)
    readers = open_sources(sources)  # refuses what the loaders can see before reading: nothing is written yet
    if previous and not same_text(previous.get("sources") or [], prints):
        if not force:
            raise BTSError(f"the text of --data / --data-hf has changed since the run in --out '{out}' began; use "
                           "a new --out or pass --force to start over.")
        previous = None  # start over: the old shard and checkpoints go
    if previous and previous.get("complete") and (out / "stitch.safetensors").is_file():
        print(f"bts: {out} is already a finished run of this command (final loss {previous['final_loss']:.4f})",
              file=sys.stderr)
        model = BTSForCausalLM.from_pretrained(out)
        if export and not (out / "members").is_dir():
            model.save_pretrained(out, export_members=True)
        return model
    s = opts.stitch
    model = BTSForCausalLM.from_members(
        hub, list(experts), names=names, hub_name="hub", num_stitches=s.num_stitches, positions=s.positions or None,
        all_e2h=s.all_e2h, init=s.init, beta=s.beta, gate_dropout=s.gate_dropout, expert_stream=s.expert_stream,
        output=s.output, dtype=dtype, device=dev)  # read straight onto the device, never a full fp32 CPU copy first
    model.set_execution(checkpoint_members=s.checkpoint_members)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_dir(hub, "--hub"))
    # ---- every check passed: from here on `out` is written ----
    made_out = not out.exists()
    if force and previous is None and (out / STATE).exists():
        shutil.rmtree(out / STATE)  # another command's training state must not be resumed into this one
    job = {"command": record, "sources": prints, "complete": False}
    atomic_write_json(out / STATE / "job.json", job)  # first: a kill while tokenizing leaves a run to resume
    try:
        shard = build_text(out / STATE / SHARD, sources, readers, tok, seq_len=opts.data["seq_len"],
                           max_chars=opts.data["max_chars"], max_tokens=opts.data["max_tokens"],
                           total_chars=total_bytes(prints))
    except BTSError:  # bad text found while reading it: leave nothing of this run behind
        if previous is None:
            shutil.rmtree(out if made_out else out / STATE, ignore_errors=True)
        raise
    job["tokens"] = len(shard)
    atomic_write_json(out / STATE / "job.json", job)
    return _train_and_save(model, tok, shard, opts, out, dev, job, resuming=previous is not None, export=export)


def _train_and_save(model, tok, stream, opts: JobOptions, out: Path, dev, job: dict, resuming: bool,
                    export: bool = False):
    from bts.data.streams import Batcher
    from bts.train.loop import train

    cfg = opts.train
    batcher = Batcher({"text": stream}, {"text": 1.0}, opts.data["seq_len"], cfg.batch_size, cfg.grad_accum,
                      seed=opts.seed * 7919 + 7)
    if opts.stitch.init == "lstsq":  # W_proj fitted before training (a resumed run's checkpoint then wins)
        calibrate_from(model, dataclasses.replace(batcher, seed=opts.seed * 7919 + CALIBRATION_SALT),
                       opts.stitch.init_batches, opts.stitch.init_ridge)
    trainable = model.named_stitch_parameters()
    n = sum(p.numel() for p in trainable.values())
    n_experts = len(model.config.expert_names)
    print(f"bts: stitching {n_experts} expert{'s' if n_experts != 1 else ''} into the hub: stitches after blocks "
          f"{model.config.stitch_positions}, {n:,} trainable parameters, {len(stream):,} tokens of text, "
          f"{cfg.steps} steps on {dev} ({next(model.hub.parameters()).dtype} members){'; resuming from the last checkpoint' if resuming else ''}", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    result = train(model, trainable, lambda step: [to_device(m, dev) for m in batcher(step)], cfg, out / STATE,
                   desc="stitch", seed=opts.seed, device=dev)
    tok.save_pretrained(out)
    model.save_pretrained(out, export_members=export)
    atomic_write_json(out / STATE / "job.json", {**job, "complete": True, "final_loss": result.final_loss,
                                                 "trained_tokens": result.tokens})
    print(f"bts: saved {out} (final loss {result.final_loss:.4f}, {time.perf_counter() - t0:.0f}s); load it with "
          f"import bts; AutoModelForCausalLM.from_pretrained('{out}')", file=sys.stderr, flush=True)
    return model


def _sources(data, data_hf, d: dict) -> list[tuple[str, dict]]:
    """(flag, domain spec) per text source; a --data pattern that matches no file is refused here."""
    if not data and not data_hf:
        raise BTSError("no text given: pass --data FILE_OR_GLOB … and/or --data-hf NAME.")
    fields = {"text_field": d["text_field"], "group_field": d["group_field"], "max_chars": 0}
    for pattern in data:
        path = os.path.expanduser(str(pattern))
        found = glob.glob(path, recursive=True) if glob.has_magic(path) else [path] if os.path.exists(path) else []
        if not [f for f in found if os.path.isfile(f)]:
            raise BTSError(f"--data '{pattern}' matches no file.")
    specs = [("--data", {"source": "files", "files": list(data), **fields})] if data else []
    for item in data_hf:
        parts = str(item).split(":")
        if len(parts) > 3 or not parts[0]:
            raise BTSError(f"--data-hf '{item}' must be NAME, NAME:CONFIG or NAME:CONFIG:SPLIT.")
        name, config, split = (parts + ["", "train"][len(parts) - 1:])[:3]
        specs.append(("--data-hf", {"source": "hf", "dataset": name, "config": config,
                                             "split": split or "train", **fields}))
    return specs


def _previous_job(out: Path, record: dict, force: bool) -> dict | None:
    """The job.json of an earlier run of this same command in `out` (resume it), or None for a new, empty or
    forced `out`. Anything else in a non-empty `out` is refused."""
    if out.exists() and not out.is_dir():
        raise BTSError(f"--out '{out}' is a file, not a directory.")
    if not out.exists() or not any(out.iterdir()):
        return None
    job = out / STATE / "job.json"
    try:
        previous = json.loads(job.read_text()) if job.is_file() else None
    except (ValueError, UnicodeDecodeError):
        previous = None
    if previous is not None and previous.get("command") == record:
        return previous
    if force:
        return None
    if previous is None:
        raise BTSError(f"--out '{out}' is not empty and holds no bts stitch run; choose a new directory or pass "
                       "--force.")
    key, old, new = _first_difference(previous.get("command", {}), record)
    why = " (more steps is another learning-rate schedule, not a continuation)" if key == "options.train.steps" else ""
    raise BTSError(f"--out '{out}' holds a bts stitch run of another command ({key} was {old!r}, now {new!r}){why}; "
                   "use a new --out, or pass --force to start over.")


# Settings that do not change what is trained: a resumed run may change them.
NOT_RESULT = ("log_every", "ckpt_every", "report_to")


def _result_options(options: dict) -> dict:
    stitch = options["stitch"]
    if stitch.get("init") != "lstsq":  # the calibration keys change nothing then (and older runs lack them)
        stitch = {k: v for k, v in stitch.items() if k not in CALIBRATION_KEYS}
    return {**options, "stitch": stitch,
            "train": {k: v for k, v in options["train"].items() if k not in NOT_RESULT}}


def _canonical(spec: str) -> str:
    """A member as the run records it: a local folder by its absolute path, a hub id as written."""
    path = Path(str(spec)).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)

