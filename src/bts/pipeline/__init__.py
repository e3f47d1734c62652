"""The Branch-Train-Stitch pipeline: recipes (checked once, at load), the run directory (lock, markers), its data,
one function per stage, and the modularity experiment. `bts.pipeline.run.Run(recipe).all()` runs it."""


def __getattr__(name):  # bts.pipeline was a module before the layered layout; its names keep working for a release
    from bts import _moved

    return _moved.attribute(__name__, name)
