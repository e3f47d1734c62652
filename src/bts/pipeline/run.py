"""The Branch-Train-Stitch pipeline as stages over one run directory.

    run = Run(load_recipe("demo"))
    run.all()   # data → tokenizer → seed → experts → stitch → baselines → evaluate → downstream → modularity
                #   → report

Each stage writes its outputs under the run directory and, when complete, a marker stages/<stage>.json; running
again skips finished stages and resumes an interrupted training stage from its last checkpoint. Expert stages are
independent of each other (`bts run RECIPE --stages expert:code` on one machine, expert:math on another).

Layout of a run directory:
    recipe.yaml, env.json                 resolved recipe, package versions, git commit
    data/<domain>/{train,val,heldout}.jsonl, provenance.json
    tokenizer/                            (when no seed model is given)
    models/seed, models/expert-<domain>, models/bts, models/<baseline>
    train/<phase>/metrics.jsonl, ckpt/    per training phase
    eval/<method>.json, results.json, report/{report.md, report.html, *.png}
    modularity/{settings.json, results.json, train/}   when modularity.enabled (docs/modularity.md)
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
import yaml

from bts import faults
from bts.data import corpora
from bts.train import distributed
from bts.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from bts.data.streams import Batcher, eval_windows, interleave, tokenize_stream
from bts.eval.heldout import heldout_loss
from bts.errors import BTSError
from bts.pipeline.recipe import Recipe, load_recipe, recipe_to_dict
from bts.train.loop import train

# errno values of a write that failed for reasons outside bts (disk full, quota, read-only or not a folder)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EFBIG}
STAGES = ("data", "tokenizer", "seed", "experts", "stitch", "baselines", "evaluate", "downstream", "modularity",
          "report")
# Under torchrun every rank runs these (they train); the other stages run on rank 0 while the rest wait.
PARALLEL_STAGES = ("seed", "experts", "stitch", "baselines")


def log(msg: str) -> None:
    if distributed.is_main():
        print(f"bts: {msg}", file=sys.stderr, flush=True)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class Run:
    def __init__(self, recipe: Recipe, run_dir: str | os.PathLike | None = None):
        self.recipe = recipe
        self.root = Path(run_dir or recipe.run_dir or Path("runs") / recipe.name)
        self.domains = list(recipe.data.domains)
        self._tokenizer = None
        self._streams: dict = {}

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    def path(self, *parts) -> Path:
        return self.root.joinpath(*parts)

    def done(self, stage: str) -> dict | None:
        marker = self.path("stages", f"{stage.replace(':', '-')}.json")
        return json.loads(marker.read_text()) if marker.exists() else None

    @contextmanager
    def stage(self, stage: str):
        """Run a stage body unless it finished before; record its wall time when it completes."""
        info = {"stage": stage}
        t0 = time.perf_counter()
        log(f"stage {stage} …")
        yield info
        info["wall_s"] = round(time.perf_counter() - t0, 2)
        if not distributed.is_main():  # rank 0 records the stage
            return
        atomic_write_json(self.path("stages", f"{stage.replace(':', '-')}.json"), info)
        log(f"stage {stage} done in {info['wall_s']:.0f}s")

    @contextmanager
    def lock(self, name: str = "run"):
        """One process per run directory: a second one refuses instead of interleaving writes (under torchrun,
        rank 0 holds it for the job)."""
        if not distributed.is_main():
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.path(f"{name}.lock")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = lock.read_text().strip() or "?"
            if not (pid.isdigit() and not _alive(int(pid))):
                raise BTSError(f"run directory '{self.root}' is in use by process {pid} (remove {lock} if it is not).")
            fd = self._take_over(lock, pid)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    def _take_over(self, lock: Path, dead_pid: str) -> int:
        """Replace the lock of a crashed run. Two processes may both find it stale: only the one that creates the
        side file <lock>.takeover may replace it, and only if the lock still names the dead process (the other
        may have replaced it already)."""
        guard = lock.with_name(lock.name + ".takeover")
        try:
            guard_fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise BTSError(f"run directory '{self.root}' is being taken over by another process "
                           f"(remove {guard} if none is running).") from None
        try:
            now = lock.read_text().strip() if lock.exists() else dead_pid
            if now != dead_pid:
                raise BTSError(f"run directory '{self.root}' is in use by process {now or '?'} "
                               f"(remove {lock} if it is not).")
            lock.unlink(missing_ok=True)
            return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        finally:
            os.close(guard_fd)
            guard.unlink(missing_ok=True)

    def write_manifest(self) -> None:
        current = recipe_to_dict(self.recipe)
        stored = self.path("recipe.yaml")
        if stored.exists():  # finished stages were made with that recipe: never mix two recipes in one run
            # ... except the modularity section: no other stage reads it, and its own stage reruns when it changes
            # A recipe stored by an older bts is read with today's defaults, so options added since do not count
            # as changes.
            old = {k: v for k, v in recipe_to_dict(load_recipe(str(stored))).items() if k != "modularity"}
            diff = _first_difference(old, {k: v for k, v in current.items() if k != "modularity"})
            if diff is not None:
                key, old, new = diff
                raise BTSError(f"run directory '{self.root}' was made with {key}={old!r}, not {new!r}; "
                               "use a new --run-dir (or delete this one) to run a changed recipe.")
        atomic_write_text(stored, yaml.safe_dump(current, sort_keys=False))
        versions = {}
        for pkg in ("bts", "torch", "transformers", "tokenizers", "safetensors", "datasets"):
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                    cwd=Path(__file__).parent).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
        atomic_write_json(self.path("env.json"), {"versions": versions, "git_commit": commit,
                                                  "python": platform.python_version(), "threads": torch.get_num_threads()})

    # ---- stages -----------------------------------------------------------------------------------------------
    def all(self, only: list[str] | None = None) -> dict | None:
        """Run the stages (all, or `only`: names from STAGES plus expert:<domain>) in order."""
        wanted = set(only or STAGES)
        unknown = wanted - set(STAGES) - {f"expert:{d}" for d in self.recipe.expert_domains}
        if unknown:
            raise BTSError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)} and expert:<domain>.")
        try:
            distributed.init()  # joins the torchrun process group when launched by torchrun
            # Expert-only jobs run side by side on one run directory (`bts run --print-expert-commands`): each
            # takes its own lock.
            experts_only = bool(only) and all(s.startswith("expert:") for s in wanted)
            with self.lock("run-" + "-".join(sorted(wanted)).replace(":", "-") if experts_only else "run"):
                if distributed.is_main():
                    self.write_manifest()
                t0 = time.perf_counter()
                for stage in STAGES:
                    if distributed.active() and stage not in PARALLEL_STAGES:
                        if distributed.is_main() and stage in wanted:
                            getattr(self, stage)()
                    elif stage == "experts":
                        for d in self.recipe.expert_domains:
                            if "experts" in wanted or f"expert:{d}" in wanted:
                                self.expert(d)
                    elif stage in wanted:
                        getattr(self, stage)()
                    distributed.barrier()
                log(f"finished in {time.perf_counter() - t0:.0f}s; run directory: {self.root}")
        except OSError as exc:
            if exc.errno not in WRITE_ERRNOS:
                raise
            # A full disk or an unwritable folder is the user's to fix: one line, not a traceback. Writes are
            # atomic and stage markers come last, so nothing half-written is taken for complete on the next run.
            where = f" at '{exc.filename}'" if exc.filename else ""
            raise BTSError(f"run directory '{self.root}': {exc.strerror}{where}; finished stages are kept and the "
                           "same command resumes once this is fixed.") from None
        results = self.path("results.json")
        return json.loads(results.read_text()) if results.exists() else None

    def data(self) -> None:
        if self.done("data"):
            return
        with self.stage("data") as info:
            fractions = tuple(self.recipe.data.split_fractions)
            for name, spec in self.recipe.data.domains.items():
                docs = corpora.load_domain(name, spec)
                splits = corpora.split_by_group(docs, fractions=fractions, seed=self.recipe.seed)
                for split, items in splits.items():
                    atomic_write_text(self.path("data", name, f"{split}.jsonl"), "".join(
                        json.dumps({"id": d.id, "group": d.group, "text": d.text}, ensure_ascii=False) + "\n"
                        for d in items))
                atomic_write_json(self.path("data", name, "provenance.json"), self._provenance(name, spec, docs))
                info[name] = {split: len(items) for split, items in splits.items()}
                faults.point(f"data:{name}")

    def _provenance(self, name: str, spec, docs) -> dict:
        if spec.source == "builtin":
            prov = dict(corpora.provenance(name))
        elif spec.source == "fixture":
            prov = dict(corpora.fixture_provenance(name))
        else:
            prov = {"source": spec.source, "files": spec.files, "dataset": spec.dataset, "license": "user-provided"}
        prov["documents_used"] = len(docs)
        prov["chars_used"] = sum(len(d.text) for d in docs)
        return prov

    def texts(self, domain: str, split: str) -> list[str]:
        with open(self.path("data", domain, f"{split}.jsonl"), encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]

    def tokenizer(self):
        if self._tokenizer is not None:
            return self._tokenizer
        from transformers import AutoTokenizer

        seed_path = self.recipe.seed_model.path
        if seed_path:
            from bts.core.members import resolve_dir

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_dir(seed_path, "seed_model.path"))
            return self._tokenizer
        folder = self.path("tokenizer")
        if not self.done("tokenizer"):
            from bts.data.tokenizer import train_bpe

            with self.stage("tokenizer") as info:
                budget = self.recipe.tokenizer.train_chars // max(1, len(self.domains))
                texts = []
                for d in self.domains:
                    taken = 0
                    for t in self.texts(d, "train"):
                        texts.append(t[: budget - taken])
                        taken += len(texts[-1])
                        if taken >= budget:
                            break
                tok = train_bpe(texts, self.recipe.tokenizer.vocab_size)
                tok.save_pretrained(folder)
                info["vocab_size"] = len(tok)
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        return self._tokenizer

    def stream(self, domain: str, split: str) -> torch.Tensor:
        key = (domain, split)
        if key not in self._streams:
            cache = self.path("data", domain, f"{split}.tokens.pt")
            if cache.exists():
                self._streams[key] = torch.load(cache, weights_only=True)
            else:
                stream = tokenize_stream(self.tokenizer(), self.texts(domain, split))
                if len(stream) == 0:
                    raise BTSError(f"domain '{domain}' has an empty {split} split.")
                buffer = io.BytesIO()
                torch.save(stream, buffer)
                atomic_write_bytes(cache, buffer.getvalue())  # a unique temp name: ranks may tokenize at once
                self._streams[key] = stream
        return self._streams[key]

    def batcher(self, weights: dict, cfg, salt: int) -> Batcher:
        streams = {d: self.stream(d, "train") for d in weights}
        return Batcher(streams, weights, self.recipe.data.seq_len, cfg.batch_size, cfg.grad_accum,
                       seed=self.recipe.seed * 7919 + salt)

    def seed(self) -> None:
        out = self.path("models", "seed")
        if self.done("seed"):
            return
        with self.stage("seed") as info:
            rs = self.recipe.seed_model
            tok = self.tokenizer()
            if rs.path:  # a given pretrained seed: copy it in as it is
                from bts.core.members import load_causal_lm

                model, _ = load_causal_lm(rs.path, "seed_model.path")
                model.save_pretrained(out)
                tok.save_pretrained(out)
                info.update(trained=False, params=count_params(model))
                return
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(self.recipe.seed)
            config = LlamaConfig(vocab_size=len(tok), hidden_size=rs.hidden_size, num_hidden_layers=rs.num_layers,
                                 num_attention_heads=rs.num_heads, num_key_value_heads=rs.num_kv_heads,
                                 intermediate_size=rs.intermediate_size,
                                 max_position_embeddings=max(512, self.recipe.data.seq_len),
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
            model = LlamaForCausalLM(config)
            trainable = dict(model.named_parameters())
            batches = self.batcher({d: 1.0 for d in self.domains}, rs.train, salt=1)
            result = train(model, trainable, batches, rs.train, self.path("train", "seed"), desc="seed",
                           seed=self.recipe.seed)
            if distributed.is_main():
                model.save_pretrained(out)
                tok.save_pretrained(out)
            info.update(trained=True, params=count_params(model), tokens=result.tokens, train_wall_s=result.wall_s,
                        final_loss=result.final_loss)

    def expert(self, domain: str) -> None:
        stage = f"expert:{domain}"
        if self.done(stage):
            return
        if not self.done("seed"):
            raise BTSError(f"stage {stage} needs the seed model; run the seed stage first.")
        from transformers import AutoModelForCausalLM

        with self.stage(stage) as info:
            cfg = self.recipe.experts.train
            model = AutoModelForCausalLM.from_pretrained(self.path("models", "seed"), dtype=torch.float32)
            if not self.recipe.experts.train_embeddings:
                model.get_input_embeddings().requires_grad_(False)
                model.get_output_embeddings().requires_grad_(False)
            trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
            salt = 100 + self.domains.index(domain)
            result = train(model, trainable, self.batcher({domain: 1.0}, cfg, salt), cfg,
                           self.path("train", f"expert-{domain}"), desc=f"expert:{domain}", seed=self.recipe.seed)
            out = self.path("models", f"expert-{domain}")
            if distributed.is_main():
                model.save_pretrained(out)
                self.tokenizer().save_pretrained(out)
            info.update(tokens=result.tokens, train_wall_s=result.wall_s, final_loss=result.final_loss,
                        params=count_params(model))

    def stitch_mix(self) -> dict:
        """The stitch datamix: general_weight of the seed's general mix (all domains equally) plus the rest split
        across the expert domains (equally, or by stitch.domain_weights)."""
        s = self.recipe.stitch
        experts = self.recipe.expert_domains
        dw = {d: float(s.domain_weights.get(d, 1.0)) for d in experts} if s.domain_weights else {d: 1.0 for d in experts}
        total = sum(dw.values())
        mix = {d: s.general_weight / len(self.domains) for d in self.domains}
        for d, w in dw.items():
            mix[d] += (1 - s.general_weight) * w / total
        return mix

    def build_stitched(self):
        from bts.core.model import BTSForCausalLM

        s = self.recipe.stitch
        experts = self.recipe.expert_domains
        return BTSForCausalLM.from_members(
            str(self.path("models", "seed")), [str(self.path("models", f"expert-{d}")) for d in experts],
            names=experts, hub_name="seed", num_stitches=s.num_stitches, positions=s.positions or None,
            all_e2h=s.all_e2h, init=s.init, beta=s.beta, gate_dropout=s.gate_dropout, expert_stream=s.expert_stream)

    def stitch(self) -> None:
        if self.done("stitch"):
            return
        with self.stage("stitch") as info:
            cfg = self.recipe.stitch.train
            model = self.build_stitched()
            model.set_execution(checkpoint_members=self.recipe.stitch.checkpoint_members)
            trainable = {f"stitches.{k}": p for k, p in model.stitches.named_parameters()}
            mix = self.stitch_mix()
            probe = self.mixed_heldout(max_tokens=2 * self.recipe.data.seq_len)

            def gate_stats():
                return {"gates": gate_summary(model, probe)}

            result = train(model, trainable, self.batcher(mix, cfg, salt=7), cfg, self.path("train", "stitch"),
                           desc="stitch", seed=self.recipe.seed, metrics_fn=gate_stats)
            if distributed.is_main():
                model.save_pretrained(self.path("models", "bts"))
                self.tokenizer().save_pretrained(self.path("models", "bts"))
            info.update(tokens=result.tokens, train_wall_s=result.wall_s, final_loss=result.final_loss,
                        trainable_params=sum(p.numel() for p in trainable.values()), mix=mix)

    def baselines(self) -> None:
        from bts.baselines.registry import REGISTRY

        for method in self.recipe.baselines.methods:
            stage = f"baseline:{method}"
            if self.done(stage):
                continue
            with self.stage(stage) as info:
                info.update(REGISTRY[method].build(self))

    # ---- evaluation ------------------------------------------------------------------------------------------
    def mixed_heldout(self, max_tokens: int | None = None) -> torch.Tensor:
        """Held-out text that switches domain every half window (scored as 'mixed')."""
        seq = self.recipe.data.seq_len
        budget = max_tokens or self.recipe.data.eval_tokens or 1 << 30
        return interleave([self.stream(d, "heldout") for d in self.domains], seq // 2, budget)

    def methods(self) -> dict:
        """Every evaluated method: name -> (loader, accounting info). Loaders build the model on demand."""
        from bts.baselines.registry import REGISTRY

        methods = {"seed": (lambda: _load_hf(self.path("models", "seed")), self._info("seed"))}
        for d in self.recipe.expert_domains:
            methods[f"expert:{d}"] = (lambda d=d: _load_hf(self.path("models", f"expert-{d}")), self._info(f"expert:{d}"))
        if self.done("stitch"):
            methods["bts"] = (lambda: _load_bts(self.path("models", "bts")), self._info("stitch"))
        for method in self.recipe.baselines.methods:
            info = self.done(f"baseline:{method}")
            if info is not None:
                methods[method] = (functools.partial(REGISTRY[method].load, self.path("models", method), info), info)
        return methods

    def _info(self, stage: str) -> dict:
        return self.done(stage) or {}

    def evaluate(self) -> None:
        if self.done("evaluate"):
            return
        with self.stage("evaluate"):
            seq, budget = self.recipe.data.seq_len, self.recipe.data.eval_tokens
            windows = {d: eval_windows(self.stream(d, "heldout"), seq, budget) for d in self.domains}
            mixed = eval_windows(self.mixed_heldout(), seq)
            results = {"schema": "bts.results/1", "recipe": self.recipe.name, "domains": self.domains,
                       "expert_domains": self.recipe.expert_domains, "seq_len": seq, "methods": {}}
            for name, (load, stage_info) in self.methods().items():
                cached = self.path("eval", f"{name.replace(':', '-')}.json")
                entry = _read_cached(cached)
                if entry is not None:
                    results["methods"][name] = entry
                    continue
                t0 = time.perf_counter()
                model, accounting = load()
                losses = {d: heldout_loss(model, w) for d, w in windows.items()}
                entry = {"heldout_loss": losses, "avg_heldout_loss": sum(losses.values()) / len(losses),
                         "mixed_heldout_loss": heldout_loss(model, mixed), **accounting}
                for key in ("tokens", "train_wall_s"):
                    if key in stage_info:
                        entry["train_" + key if key == "tokens" else key] = stage_info[key]
                entry["eval_wall_s"] = round(time.perf_counter() - t0, 2)
                atomic_write_json(cached, entry)
                faults.point(f"evaluate:{name}")
                results["methods"][name] = entry
                log(f"  {name:<22} avg held-out loss {entry['avg_heldout_loss']:.4f}")
                del model
            atomic_write_json(self.path("results.json"), results)

    def downstream(self) -> None:
        """Downstream tasks (MMLU groups, HellaSwag, GSM8K/HumanEval likelihoods, …) for every method; the
        section is added to results.json under "downstream"."""
        d = self.recipe.downstream
        if not d.tasks or self.done("downstream"):
            return
        from bts.eval.downstream.scoring import evaluate_tasks

        with self.stage("downstream"):
            data_dir = None
            if d.fixtures:
                from bts.eval.downstream.tasks import FIXTURES

                data_dir = FIXTURES
            tok = self.tokenizer()
            models = {name: (lambda load=load: (load()[0], tok)) for name, (load, _) in self.methods().items()}
            section = evaluate_tasks(models, list(d.tasks), self.path("downstream"), limit=d.limit or None,
                                     fewshot=d.fewshot, seed=self.recipe.seed, data_dir=data_dir,
                                     max_length=4 * self.recipe.data.seq_len)
            results = json.loads(self.path("results.json").read_text())
            results["downstream"] = section
            atomic_write_json(self.path("results.json"), results)

    def modularity(self) -> None:
        """The modularity measurement (bts.pipeline.modularity.measure_modularity, docs/modularity.md) on this run's stitched
        model, when modularity.enabled: results under modularity/, shown in the report."""
        m = self.recipe.modularity
        if not m.enabled:
            return
        settings = dataclasses.asdict(m)
        done = self.done("modularity")
        if done and done.get("settings") == settings:
            return
        if not self.done("stitch"):
            raise BTSError("the modularity stage needs the stitched model; run the stitch stage first.")
        if len(self.recipe.expert_domains) < 2:
            raise BTSError(f"the modularity stage needs at least 2 experts (the run has {self.recipe.expert_domains}).")
        from bts.pipeline.modularity import measure_modularity

        out = self.path("modularity")
        # Training checkpoints under modularity/train resume an interrupted measurement exactly, but only with the
        # same settings: anything left by other settings (or by an older bts) is cleared first.
        stamp = out / "settings.json"
        if out.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != settings):
            shutil.rmtree(out)
        atomic_write_json(stamp, settings)
        with self.stage("modularity") as info:
            results = measure_modularity(self, add_fraction=m.add_fraction, retrain_fraction=m.retrain_fraction,
                                         focus_weight=m.focus_weight, sparse=m.sparse, out=out)
            info.update(settings=settings, full_avg=results["full"]["avg"], seed_avg=results["seed"]["avg"])

    def report(self) -> None:
        from bts.report import write_report

        with self.stage("report"):
            write_report(self)


# ---- model loaders with parameter accounting ------------------------------------------------------------------
def _load_hf(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n = count_params(model)
    return model, {"trainable_params": n, "total_params": n, "active_params": n}


def _load_bts(path):
    from bts.core.model import BTSForCausalLM

    model = BTSForCausalLM.from_pretrained(path).eval()
    stitch = sum(p.numel() for p in model.stitch_parameters())
    total = count_params(model)
    return model, {"trainable_params": stitch, "total_params": total, "active_params": total}


@torch.no_grad()
def gate_summary(model, ids: torch.Tensor) -> list[dict]:
    """Mean mixing weight per member for every stitch layer on a probe (E→H: share of the new hub state;
    H→E: how far expert streams move towards the hub), plus the blend strength |tanh(a)| with the blend init."""
    was_training = model.training
    model.eval()
    gates = model.gate_values(ids.view(1, -1) if ids.dim() == 1 else ids, effective=True)
    names = ["hub"] + list(model.config.expert_names)
    out = []
    for stitch, g in zip(model.stitches, gates):
        mean = g.mean(dim=(0, 1, 3)).tolist()  # over batch, tokens, channels -> per member
        row = {"kind": stitch.kind, **{n: round(v, 4) for n, v in zip(names, mean)}}
        if stitch.blend is not None:
            row["blend"] = round(torch.tanh(stitch.blend).abs().mean().item(), 4)
        out.append(row)
    model.train(was_training)
    return out


def _read_cached(path: Path) -> dict | None:
    """A cached eval entry, or None when absent or damaged (then it is recomputed, never half-read)."""
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
        if isinstance(entry, dict) and "avg_heldout_loss" in entry:
            return entry
    except (ValueError, UnicodeDecodeError):
        pass
    log(f"warning: cached evaluation {path} is damaged; evaluating again")
    return None


def _first_difference(old, new, prefix: str = ""):
    """The first dotted key whose value differs between two nested dicts, with both values; None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
