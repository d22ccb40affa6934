"""Device and dtype choice: the one module that decides what this hardware runs fast *and* soundly.

bfloat16 is ~2.8x faster than float32 on a Xeon with AMX, and ~5.5x *slower* on a CPU without bf16
matrix units (AVX2-only EPYC, most laptops), where it is emulated. So `dtype="auto"` (the default
everywhere) asks the hardware:

- CPU: bfloat16 only where the CPU has bf16 matrix units (AMX or AVX512-BF16) *and* a sub-second
  micro-benchmark confirms that a bf16 matmul beats float32 here; else float32. The verdict is cached
  per machine in the cache folder, keyed by CPU, torch version, threads and the ISA-limiting
  environment variables (so `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` gets its own entry).
- CUDA: bfloat16 where the GPU supports it, else float32 (float16 can overflow the residual stream).
- MPS: float32 (bf16 support and speed vary with the macOS version).

The choice is printed once per process, in one line, with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch

from saelab.errors import DeviceError

log = logging.getLogger(__name__)

AUTO = "auto"
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda", "mps")
# bf16 must beat float32 by this factor in the micro-benchmark to be chosen (noise margin).
BF16_MIN_SPEEDUP = 1.2
_CACHE_FILE = "dtype_choice.json"
_CACHE_VERSION = 2
_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


@dataclass(frozen=True)
class DtypeChoice:
    """What `auto` chose for one device, and why (printed once; written beside benchmark figures)."""

    dtype: str
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# -- devices --------------------------------------------------------------------------------------
def resolve_device(name: str | torch.device | None = AUTO) -> torch.device:
    """'auto' (or None) -> cuda, then mps, then cpu; an explicit device must exist."""
    if isinstance(name, torch.device):
        return name
    text = (name or AUTO).strip().lower()
    if text == AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = text.split(":")[0]
    if kind not in DEVICES:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda (or cuda:N) or mps.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {name!r} was asked for but this machine has no usable CUDA GPU (or torch is a CPU "
            "build). Use --device cpu, or --device auto to take a GPU only where there is one."
        )
    if kind == "mps" and not _mps_available():
        raise DeviceError(f"device {name!r} was asked for but MPS is not available here; use cpu or auto.")
    return torch.device(text)


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


# -- dtypes ---------------------------------------------------------------------------------------
def parse_dtype(name: str | torch.dtype) -> torch.dtype | str:
    """A torch dtype, or AUTO; unknown names are a clear error."""
    if isinstance(name, torch.dtype):
        return name
    text = str(name).strip().lower().removeprefix("torch.")
    if text == AUTO:
        return AUTO
    if text not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; use auto, bfloat16, float32 or float16.")
    return DTYPES[text]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(
    name: str | torch.dtype | None = AUTO, device: str | torch.device | None = AUTO, announce: bool = True
) -> torch.dtype:
    """The torch dtype for `name` on `device`: itself, or what `auto` picks (printed once)."""
    parsed = parse_dtype(name or AUTO)
    if parsed != AUTO:
        return parsed
    device = resolve_device(device)
    choice = auto_dtype(device)
    if announce:
        _announce(device, choice)
    return choice.torch_dtype


def resolve_dtype_name(name: str | torch.dtype | None = AUTO, device=AUTO, announce: bool = True) -> str:
    return dtype_name(resolve_dtype(name, device, announce))


def auto_dtype(device: torch.device) -> DtypeChoice:
    """What this hardware runs fast and soundly (see the module docstring)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(index)
        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", f"{gpu} supports bfloat16")
        return DtypeChoice("float32", f"{gpu} has no bfloat16 support (float16 could overflow)")
    if device.type == "mps":
        return DtypeChoice("float32", "MPS: bfloat16 support varies with the macOS version")
    return _cpu_choice()


def cpu_bf16_units() -> tuple[bool, str]:
    """(has bf16 matrix units, which) from the CPU's flags, honouring ISA-limiting variables."""
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if limit and not any(isa in limit for isa in ("AMX", "BF16", "ALL", "DEFAULT")):
        return False, f"ONEDNN_MAX_CPU_ISA={limit} hides the bf16 units"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX"):
        return False, f"torch's CPU capability is {torch.backends.cpu.get_cpu_capability()}"
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return True, "AMX"
    if "avx512_bf16" in flags:
        return True, "AVX512-BF16"
    return False, "no AMX or AVX512-BF16"


@cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@cache
def cpu_model() -> str:
    """The CPU's marketing name (for figures: every benchmark says what it ran on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cache_key() -> dict:
    env = {var: os.environ.get(var, "") for var in _ISA_VARIABLES}
    return {
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "env": env,
    }


@cache
def _cpu_choice() -> DtypeChoice:
    has_units, which = cpu_bf16_units()
    if not has_units:
        return DtypeChoice("float32", f"CPU without bf16 matrix units ({which})")
    path = _choice_cache_path()
    key = json.dumps(_cache_key(), sort_keys=True)
    saved = _read_choices(path)
    if key in saved:
        try:
            return DtypeChoice(**saved[key])
        except TypeError:
            pass
    speedup = bf16_speedup()
    if speedup >= BF16_MIN_SPEEDUP:
        choice = DtypeChoice(
            "bfloat16", f"CPU has {which}; a bf16 matmul ran {speedup:.1f}x faster than fp32"
        )
    else:
        choice = DtypeChoice(
            "float32", f"CPU has {which} but a bf16 matmul ran at {speedup:.2f}x fp32 speed here"
        )
    _save_choice(path, {**saved, key: asdict(choice)})
    return choice


def _choice_cache_path() -> Path:
    from saelab.core.paths import cache_dir

    return cache_dir() / _CACHE_FILE


def _read_choices(path: Path) -> dict:
    """{machine key: choice} from the cache file; a missing or corrupt file is an empty cache."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return (
        saved.get("choices", {}) if isinstance(saved, dict) and saved.get("version") == _CACHE_VERSION else {}
    )


def _save_choice(path: Path, choices: dict) -> None:
    from saelab.core.fileio import atomic_write_json

    try:
        atomic_write_json(path, {"version": _CACHE_VERSION, "choices": choices})
    except OSError as err:  # a read-only cache only costs the micro-benchmark in the next process
        log.warning("could not cache the dtype choice in %s (%s)", path, err)


def bf16_speedup(rows: int = 512, budget_s: float = 0.6) -> float:
    """float32 time / bfloat16 time of a [rows, 576] x [576, 1536] matmul (SmolLM2's MLP shape).

    Bounded: one bf16 product is timed first and, if it is already slower than the whole float32
    measurement, the benchmark stops there (emulated bf16 can be 50x slower than fp32).
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, 576, generator=gen)
    b = torch.randn(576, 1536, generator=gen)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up (kernel selection, oneDNN primitive creation)
        repeats, start = 0, time.perf_counter()
        while True:
            x @ y
            repeats += 1
            elapsed = time.perf_counter() - start
            if elapsed > budget_s / 4 or repeats >= 20:
                break
            if dtype == torch.bfloat16 and elapsed > times[torch.float32]:
                break
        times[dtype] = elapsed / repeats
    return times[torch.float32] / times[torch.bfloat16]


def encoder_dtype(name: str | None, device: str | torch.device | None = AUTO) -> str:
    """The TopK encoder matmul dtype: 'auto' -> bfloat16 where bf16 runs fast, else float32."""
    if name in (None, AUTO):
        return resolve_dtype_name(AUTO, device, announce=False)
    if name not in ("float32", "bfloat16"):
        raise DeviceError(f"unknown encoder dtype {name!r}; use auto, float32 or bfloat16.")
    return name


_announced: set[str] = set()


def _announce(device: torch.device, choice: DtypeChoice) -> None:
    """One line on stderr, once per process and device (rank 0 only under torchrun)."""
    if device.type in _announced or int(os.environ.get("RANK", 0)) != 0:
        return
    _announced.add(device.type)
    print(f"saelab: dtype auto -> {choice.dtype} on {device.type} ({choice.reason})", file=sys.stderr)


def describe_machine(dtype: str | None = None) -> str:
    """One line for benchmark output: CPU model, torch's CPU capability, threads, (dtype), GPU."""
    parts = [
        cpu_model(),
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"{torch.get_num_threads()} threads",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    if dtype:
        parts.append(f"dtype {dtype}")
    return ", ".join(parts)
