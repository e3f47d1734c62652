"""Old module names (before the layered layout) keep working for a release: the same module object, one
FutureWarning naming the new place."""

from __future__ import annotations

import json
import subprocess
import sys

from bts._moved import MOVED

# A fresh interpreter, so that no old name has been imported (or warned about) yet.
CHECK = """
import importlib, json, sys, warnings
import bts
out = {}
for old, new in json.loads(sys.argv[1]).items():
    target = importlib.import_module(new)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = importlib.import_module(old)
        again = importlib.import_module(old)
    out[old] = {"same": first is target and again is target and sys.modules[old] is target,
                "spec": target.__spec__.name, "warnings": [str(w.message) for w in caught
                                                            if issubclass(w.category, FutureWarning)]}
print(json.dumps(out))
"""


def test_old_names_are_the_new_modules_and_warn_once():
    cases = {**MOVED, "bts.downstream.scoring": "bts.eval.downstream.scoring",
             "bts.commands.run": "bts.cli.commands.run"}
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    for old, new in cases.items():
        assert found[old]["same"], f"{old} is not the module {new}"
        assert found[old]["spec"] == new  # the module keeps its own spec
        assert found[old]["warnings"] == [f"'{old}' moved to '{new}'; the old name works until bts 0.3."], old


NAMES = """
import importlib, json, warnings
import bts
from bts._moved import MOVED_NAMES
out = {}
for package, names in MOVED_NAMES.items():
    for name, home in names.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = getattr(importlib.import_module(package), name)
            again = getattr(importlib.import_module(package), name)
        out[f"{package}.{name}"] = {"same": first is again is getattr(importlib.import_module(home), name),
                                    "warnings": [str(w.message) for w in caught]}
print(json.dumps(out))
"""


def test_names_of_the_old_flat_modules_still_import_and_warn_once():
    from bts._moved import MOVED_NAMES

    proc = subprocess.run([sys.executable, "-c", NAMES], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    for package, names in MOVED_NAMES.items():
        for name, home in names.items():
            entry = found[f"{package}.{name}"]
            assert entry["same"], f"{package}.{name}"
            assert entry["warnings"] == [f"'{package}.{name}' moved to '{home}.{name}'; the old name works until "
                                         "bts 0.3."]


def test_a_name_that_never_existed_is_still_an_import_error():
    import pytest

    with pytest.raises(ImportError):
        exec("from bts.data import no_such_name")
    from bts.train import distributed  # a submodule is found as a submodule, not through the old names

    assert distributed.__name__ == "bts.train.distributed"
