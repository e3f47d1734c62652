"""The settings of one training phase; the loop (bts.train.loop) owns them, recipes embed them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    """One training phase (seed pretraining, an expert, the stitches, a trained baseline)."""

    steps: int = 100
    lr: float = 1e-3
    warmup: int = 10  # steps of linear warm-up, then cosine decay
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    batch_size: int = 8  # sequences per optimizer step (split into micro-batches by grad_accum)
    grad_accum: int = 1
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient-norm clipping; 0 disables it
    # autocast of the forward: auto (bfloat16 on a GPU, none on a CPU) | float32 (none; tensors keep their dtypes) |
    # bfloat16. Trainable tensors stay fp32 master weights either way.
    dtype: str = "auto"
    log_every: int = 10
    ckpt_every: int = 50
    report_to: list = field(default_factory=list)  # trackers besides metrics.jsonl: tensorboard, wandb (tracking.py)
    compile: bool = False  # torch.compile the model for this phase: faster steps after a one-off compile
