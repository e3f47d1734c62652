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
