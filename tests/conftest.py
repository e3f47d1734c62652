import os
import sys
from pathlib import Path

# Any accidental hub access must fail fast instead of retrying for ~40 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# The test models are tiny: one thread beats two (no synchronisation per op), and avoids contention on 2 cores.
torch.set_num_threads(1)
