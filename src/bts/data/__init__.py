"""Text and tokens: built-in corpora from the package registries, user sources, documents and their group splits,
the local BPE tokenizer, token streams and batches. Knows nothing about models."""


def __getattr__(name):  # bts.data was a module before the layered layout; its names keep working for a release
    from bts import _moved

    return _moved.attribute(__name__, name)
