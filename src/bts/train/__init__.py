"""Training: the one loop for every phase (bts.train.loop, which owns TrainConfig), checkpoints and resume, and
torchrun data parallelism (DDP-style replicas or FSDP2)."""


def __getattr__(name):  # bts.train was a module before the layered layout; its names keep working for a release
    from bts import _moved

    return _moved.attribute(__name__, name)
