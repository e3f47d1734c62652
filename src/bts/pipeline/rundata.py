"""A pipeline run's recipe over its run directory, and the run's data: texts, the tokenizer (trained by the
tokenizer stage, or the seed model's), token shards (bts.data.shards, under data/<domain>/<split>.tokens),
batchers reading windows from them, the stitch datamix (sampled from the shards) and held-out texts.

Used by the stages (bts.pipeline.stages), the baselines (bts.baselines.registry: recipe, path(), domains,
stream(), batcher(), stitch_mix()) and the modularity measurement; bts.pipeline.run.Run adds running the stages.
The directory's lock, markers and manifest are bts.pipeline.rundir.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bts.data.prepare import read_split
from bts.data.shards import Shard, build_shard, tokenizer_hash
from bts.data.streams import Batcher, interleave
from bts.errors import BTSError
from bts.pipeline.recipe import Recipe
from bts.pipeline.rundir import RunDir
from bts.train import distributed


class RunData:
    def __init__(self, recipe: Recipe, run_dir: str | os.PathLike | None = None):
        self.recipe = recipe
        self.dir = RunDir(run_dir or recipe.run_dir or Path("runs") / recipe.name)
        self.root = self.dir.root
        self.domains = list(recipe.data.domains)
        self._tokenizer = None
        self._streams: dict = {}
        self._device: torch.device | None = None

    # ---- where it computes ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The run's device, every stage's (recipe `device`, resolved once: a missing GPU is refused here, which
        the pipeline asks before writing anything)."""
        if self._device is None:
            from bts.core.device import resolve_device

            device = resolve_device(self.recipe.device, "device")
            if device.type == "cuda" and distributed.launched():  # under torchrun: each rank its own GPU
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            self._device = device
        return self._device

    @property
    def members_dtype(self) -> torch.dtype:
        """The dtype frozen members and evaluated models load in (recipe `members_dtype`; auto: bf16 on a GPU)."""
        from bts.core.device import members_dtype

        return members_dtype(self.recipe.members_dtype, self.device)

    def path(self, *parts) -> Path:
        return self.dir.path(*parts)

    def done(self, stage: str) -> dict | None:
        return self.dir.done(stage)

    # ---- data ------------------------------------------------------------------------------------------------
    def texts(self, domain: str, split: str) -> list[str]:
        """A split's texts as a list (small splits; big ones are read with read_split, one at a time)."""
        return [text for text, _ in read_split(self.path("data", domain, f"{split}.jsonl"))]

    def tokenizer(self):
        """The seed model's tokenizer, or the run's own (trained by the tokenizer stage, at once if it has not
        run yet)."""
        if self._tokenizer is not None:
            return self._tokenizer
        from transformers import AutoTokenizer

        if self.recipe.seed_model.path:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir("seed"))
            return self._tokenizer
        if not self.done("tokenizer"):  # the tokenizer stage
            self._train_tokenizer()
        self._tokenizer = AutoTokenizer.from_pretrained(self.path("tokenizer"))
        return self._tokenizer

    def _train_tokenizer(self) -> None:
        from bts.data.tokenizer import train_bpe

        with self.dir.stage("tokenizer") as info:
            budget = self.recipe.tokenizer.train_chars // max(1, len(self.domains))
            texts = []
            for d in self.domains:
                taken = 0
                for t, _ in read_split(self.path("data", d, "train.jsonl")):
                    texts.append(t[: budget - taken])
                    taken += len(texts[-1])
                    if taken >= budget:
                        break
            tok = train_bpe(texts, self.recipe.tokenizer.vocab_size)
            tok.save_pretrained(self.path("tokenizer"))
            info["vocab_size"] = len(tok)

    def stream(self, domain: str, split: str) -> Shard:
        """The split's token shard (data/<domain>/<split>.tokens, memory-mapped), tokenized now if it is not on
        disk yet; a shard written by another tokenizer is refused."""
        key = (domain, split)
        if key not in self._streams:
            path = self.path("data", domain, f"{split}.tokens")
            tok = self.tokenizer()
            if (path / "meta.json").exists():
                shard = Shard(path, tokenizer_hash(tok))
            else:
                spec = self.recipe.data.domains[domain]
                shard = build_shard(path, read_split(self.path("data", domain, f"{split}.jsonl")), tok,
                                    max_tokens=(getattr(spec, "max_tokens", 0) or 0) if split == "train" else 0,
                                    processes=self.recipe.data.processes, total_chars=self._chars(domain, split),
                                    desc=f"tokenize {domain}/{split}", fault=f"shard:{domain}:{split}")
            if len(shard) == 0:
                raise BTSError(f"domain '{domain}' has an empty {split} split.")
            self._streams[key] = shard
        return self._streams[key]

    def shards(self) -> None:
        """Tokenize every split of every domain that is not on disk yet (the tokenizer stage calls this)."""
        for d in self.domains:
            for split in ("train", "val", "heldout"):
                self.stream(d, split)

    def _chars(self, domain: str, split: str) -> int:
        info = (self.done("data") or {}).get(domain, {})
        return int(info.get("chars", {}).get(split, 0)) if isinstance(info.get("chars"), dict) else 0

    def batcher(self, weights: dict, cfg, salt: int) -> Batcher:
        streams = {d: self.stream(d, "train") for d in weights}
        return Batcher(streams, weights, self.recipe.data.seq_len, cfg.batch_size, cfg.grad_accum,
                       seed=self.recipe.seed * 7919 + salt, pack=self.recipe.data.pack)

    def seed_mix(self) -> dict:
        """The seed's pretraining mix: every domain, equally or by seed_model.domain_weights."""
        w = {d: float(self.recipe.seed_model.domain_weights.get(d, 1.0)) for d in self.domains}
        return {d: v / sum(w.values()) for d, v in w.items()}

    def val_curve(self, model, tokens: int):
        """A metrics function for the loop: the model's validation loss per domain on `tokens` tokens each."""
        from bts.data.streams import eval_windows
        from bts.eval.heldout import heldout_loss

        windows = {d: eval_windows(self.stream(d, "val"), self.recipe.data.seq_len, tokens)
                   for d in self.domains}

        def metrics() -> dict:
            val = {d: heldout_loss(model, w) for d, w in windows.items()}
            model.train()
            return {"val_loss": val, "val_avg": sum(val.values()) / len(val)}
        return metrics

    def stitch_mix(self, experts: list[str] | None = None) -> dict:
        """The stitch datamix: general_weight of the seed's general mix (all domains equally) plus the rest split
        across the experts' domains (equally, or by stitch.domain_weights). `experts` (default: the recipe's)
        gives another set, e.g. after adding or removing one; experts named unlike any domain add nothing, and
        with none left the mix is the general one alone."""
        s = self.recipe.stitch
        own = [e for e in (self.recipe.expert_domains if experts is None else experts) if e in self.domains]
        if not own:
            return {d: 1 / len(self.domains) for d in self.domains}
        weights = {d: float(s.domain_weights.get(d, 1.0)) for d in own}
        total = sum(weights.values())
        mix = {d: s.general_weight / len(self.domains) for d in self.domains}
        for d, w in weights.items():
            mix[d] += (1 - s.general_weight) * w / total
        return mix

    def mixed_heldout(self, max_tokens: int | None = None) -> torch.Tensor:
        """Held-out text that switches domain every half window (scored as 'mixed')."""
        seq = self.recipe.data.seq_len
        budget = max_tokens or self.recipe.data.eval_tokens or 1 << 30
        return interleave([self.stream(d, "heldout") for d in self.domains], seq // 2, budget)

    def switch_text(self, domains: list[str] | None = None) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        """Held-out text that changes domain every half window (the report's gate heatmap): ids, [(start, domain)]."""
        chunk = self.recipe.data.seq_len // 2
        pieces, bounds = [], []
        for d in (domains or self.domains)[:4]:
            bounds.append((sum(len(p) for p in pieces), d))
            pieces.append(self.stream(d, "heldout")[:chunk])
        return torch.cat(pieces), bounds

    # ---- models ----------------------------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        """The folder of model `name` (seed, expert-<domain>, bts, a baseline's name), for every stage that reads
        or writes one: a given member's own folder (seed_model.path, experts.paths; as its stage marker recorded
        it, else resolved from the recipe), else models/<name> in the run directory."""
        if name == "seed":
            spec, where, stage = self.recipe.seed_model.path, "seed_model.path", "seed"
        elif name.startswith("expert-") and name[len("expert-"):] in self.recipe.experts.paths:
            domain = name[len("expert-"):]
            spec, where, stage = self.recipe.experts.paths[domain], f"experts.paths.{domain}", f"expert:{domain}"
        else:
            spec = ""
        if not spec:
            return self.path("models", name)
        recorded = (self.done(stage) or {}).get("path")
        if recorded:
            return Path(recorded)
        from bts.core.members import resolve_dir

        return resolve_dir(spec, where)

    def build_stitched(self):
        """A fresh stitched model over the run's seed and experts, with the recipe's stitch layout: members read
        onto the run's device in members_dtype, fp32 stitches."""
        from bts.core.model import BTSForCausalLM

        s = self.recipe.stitch
        experts = self.recipe.expert_domains
        return BTSForCausalLM.from_members(
            str(self.model_dir("seed")), [str(self.model_dir(f"expert-{d}")) for d in experts],
            names=experts, hub_name="seed", num_stitches=s.num_stitches, positions=s.positions or None,
            all_e2h=s.all_e2h, init=s.init, beta=s.beta, gate_dropout=s.gate_dropout, expert_stream=s.expert_stream,
            output=s.output, dtype=self.members_dtype, device=self.device)


def load_run_data(run_dir, cls=None):
    """A pipeline run directory (its resolved recipe.yaml and data) as a RunData (or `cls`, e.g. Run)."""
    from bts.pipeline.recipe import load_recipe

    root = Path(run_dir)
    if not (root / "recipe.yaml").exists():
        raise BTSError(f"--run-dir '{root}' is not a bts run directory (no recipe.yaml).")
    return (cls or RunData)(load_recipe(str(root / "recipe.yaml")), root)
