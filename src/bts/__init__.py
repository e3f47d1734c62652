"""bts — Branch-Train-Stitch: one seed LM and its domain experts stitched into a single generalist.

Importing bts registers the "bts" model type with transformers' Auto classes, so a saved stitched model loads
with `AutoModelForCausalLM.from_pretrained(dir)` — no trust_remote_code.
"""

from bts import _moved
from bts.core.config import BTSConfig
from bts.errors import BTSError
from bts.core.model import BTSForCausalLM
from bts.core.stitch import StitchLayer

__all__ = ["BTSConfig", "BTSError", "BTSForCausalLM", "StitchLayer"]
__version__ = "0.1.0"

_moved.install()  # old module names (bts.model, bts.recipe, …) keep working for a release
