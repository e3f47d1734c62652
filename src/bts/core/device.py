"""Where bts computes and in which precision: the one place that turns `device` and `members_dtype` settings into
torch objects, turns on the fast GPU kernels, and turns an out-of-memory error into one sentence.

    device = resolve_device("auto")                  # cuda (this rank's GPU under torchrun) when present, else cpu
    dtype = members_dtype("auto", device)            # frozen members: bf16 on a GPU, fp32 on a CPU
    with oom_guard("stitch", device, batch="8 x 1024"):
        loss.backward()

Every command and recipe takes `device: auto | cpu | cuda | cuda:N`; `auto` means CUDA when
torch.cuda.is_available(). Asking for CUDA where there is none is refused in one sentence, never silently
replaced by the CPU.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager, nullcontext

import torch

from bts.errors import BTSError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMBERS_DTYPE_CHOICES = ("auto", *DTYPES)
TRAIN_DTYPES = {"auto": None, "float32": None, "bfloat16": torch.bfloat16}  # a phase's `dtype`: its autocast
OOM_HINT = ("lower the micro-batch (raise train.grad_accum or lower train.batch_size), set "
            "stitch.checkpoint_members=true, or load members in bfloat16 (members_dtype=bfloat16)")


def check_device_spec(spec: str, where: str = "device") -> None:
    """The spelling only (whether the device exists is resolve_device's question, asked when the work starts)."""
    if not isinstance(spec, str) or not DEVICE_SPEC.fullmatch(spec.strip()):
        raise BTSError(f"{where} must be {DEVICE_CHOICES} (got {spec!r}).")


def check_members_dtype(spec: str, where: str = "members_dtype") -> None:
    if spec not in MEMBERS_DTYPE_CHOICES:
        raise BTSError(f"{where} must be one of {', '.join(MEMBERS_DTYPE_CHOICES)} (got {spec!r}).")


def resolve_device(spec: str | torch.device | None = "auto", where: str = "device") -> torch.device:
    """The torch.device for `spec`. auto: CUDA when available, else the CPU. A bare `cuda` under torchrun is this
    process's GPU (LOCAL_RANK). CUDA asked for where there is none, or a GPU index past the last, is a BTSError."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip()
    check_device_spec(spec, where)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise BTSError(f"{where} is '{spec}' but torch ({torch.__version__}, {build}) sees no CUDA GPU on this "
                       f"machine; use {where}=cpu or {where}=auto.")
    index = int(spec.split(":")[1]) if ":" in spec else int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if index >= count:
        raise BTSError(f"{where} is '{spec}' but this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1}).")
    device = torch.device("cuda", index)
    enable_fast_kernels(device)
    return device


def members_dtype(spec: str | None, device: torch.device) -> torch.dtype:
    """The dtype frozen members are loaded in: `auto` is bfloat16 on a GPU and float32 on a CPU."""
    spec = spec or "auto"
    check_members_dtype(spec)
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[spec]


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training phase's `dtype` setting on `device`: `auto` is bfloat16 on a GPU and none
    (every tensor keeps its dtype) on a CPU; `float32` is none; `bfloat16` is bfloat16 anywhere."""
    if name not in TRAIN_DTYPES:
        raise BTSError(f"train dtype must be one of {', '.join(TRAIN_DTYPES)} (got '{name}').")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return TRAIN_DTYPES[name]


def device_from_map(device_map) -> torch.device | None:
    """The one device of a Hugging Face style `device_map` (None, a GPU index, "auto", "cpu", "cuda:N", a
    torch.device, or a map that puts everything on one of those); None means the library default (the CPU).
    bts models run on one device: a map over several is refused; "auto" is one GPU when there is one."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):  # {"": "cuda:0"} (lm-eval's single-device map) or every module on one device
        places = {str(v) for v in device_map.values()}
        if len(places) != 1:
            raise BTSError(f"device_map must put the whole model on one device (a bts model runs on one device; "
                           f"got {sorted(places)}).")
        device_map = device_map[next(iter(device_map))]
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        device_map = f"cuda:{device_map}"
    return resolve_device(device_map, "device_map")


def load_kwargs(device: torch.device | str | None) -> dict:
    """from_pretrained keywords that put the weights straight onto `device` (no CPU copy first); none for the CPU,
    which is where Hugging Face loads anyway."""
    if device is None or torch.device(device).type == "cpu":
        return {}
    return {"device_map": torch.device(device)}


def on_device(device: torch.device | str | None):
    """Modules built inside are allocated on `device` (torch's default-device context); None: as they would be."""
    return torch.device(device) if device is not None else nullcontext()


def enable_fast_kernels(device: torch.device) -> None:
    """TF32 matmuls and convolutions and the flash / memory-efficient SDPA kernels on a CUDA device (no-op on CPU)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_flash_sdp(True)
    torch.backends.cuda.enable_mem_efficient_sdp(True)


def autocast(device: torch.device, enabled: bool = True):
    """bfloat16 autocast on `device` (trainable fp32 master weights stay fp32; matmuls run in bf16)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@contextmanager
def oom_guard(phase: str, device: torch.device | str | None = None, batch: str = ""):
    """Turn an out-of-memory error inside the block into one sentence naming the phase, the batch and what to
    lower. The cache of freed blocks is emptied first, so the process can go on (e.g. to report)."""
    try:
        yield
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        where = f" on {device}" if device is not None else ""
        of_batch = f" with a batch of {batch}" if batch else ""
        raise BTSError(f"{phase}: out of memory{where}{of_batch}; {OOM_HINT}.") from None


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device` (non-blocking from pinned memory when it is)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first real (non-meta) parameter; the CPU when it has none."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
