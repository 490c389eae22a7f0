"""Which precision this machine runs fast, detected at run time.

bf16 pays on CUDA GPUs (compute capability 8.0 and up) and on x86 CPUs with native bf16 dot
products: AMX (``amx_bf16``, Intel Sapphire Rapids and later) or AVX512-BF16 (``avx512_bf16``,
Intel Cooper Lake, AMD Zen 4 and later). Elsewhere a CPU emulates bf16 matmul, often hundreds of
times slower than fp32, so ``"auto"`` picks fp32 there. The CPU flags come from ``/proc/cpuinfo``
(Linux) or, where that is missing, from torch's own CPUID queries; nothing is assumed.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch

FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 matmul, in order of preference
DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def read_cpuinfo_flags(path: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str] | None:
    """The ``flags`` of the first processor in a Linux ``/proc/cpuinfo``; None when unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: ``/proc/cpuinfo`` where there is one, else what torch's CPUID queries
    report (as ``avx512_bf16`` and ``amx_bf16``); empty when neither is available."""
    flags = read_cpuinfo_flags()
    if flags is not None:
        return flags
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return frozenset(flag for flag, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)())


def cpu_fast_bf16() -> tuple[bool, str]:
    """(does this CPU multiply bf16 natively, why): a flag of ``FAST_BF16_CPU_FLAGS`` and torch built with
    oneDNN (which runs bf16 matmul on those instructions)."""
    have = [f for f in FAST_BF16_CPU_FLAGS if f in cpu_flags()]
    if not have:
        return False, "CPU has no amx_bf16 or avx512_bf16 flag, bf16 matmul is emulated"
    if not torch.backends.mkldnn.is_available():
        return False, f"CPU has {have[0]} but this torch is built without oneDNN, which bf16 matmul needs"
    return True, f"CPU has {have[0]}, native bf16 matmul"


def cuda_fast_bf16(device: torch.device) -> tuple[bool, str]:
    """(does this GPU run bf16 natively, why): compute capability 8.0 (Ampere) and up."""
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if major >= 8:
        return True, f"CUDA device {name}, compute capability {major}.{minor}"
    return False, f"CUDA device {name} has compute capability {major}.{minor}, bf16 needs 8.0 or newer"


@dataclass(frozen=True)
class Precision:
    """A resolved dtype, why it was chosen, and a warning when an explicit choice will run slowly."""

    dtype: torch.dtype
    reason: str
    warning: str | None = None

    @property
    def name(self) -> str:
        """``"bfloat16"``, ``"float32"`` or ``"float16"``."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def is_bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    def describe(self) -> str:
        """One line for the first lines of a command's output."""
        return f"precision: {self.name} ({self.reason})"

    def metadata(self) -> dict[str, str]:
        """String entries for a file's or a metrics record's metadata."""
        return {"dtype": self.name, "dtype_reason": self.reason}


def fast_bf16(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(is bf16 fast on ``device``, why). ``None`` means the CPU."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return cuda_fast_bf16(dev)
    if dev.type == "cpu":
        return cpu_fast_bf16()
    return False, f"device type {dev.type!r}: auto picks bf16 only on CUDA and on CPUs with AMX/AVX512-BF16"


def choose_precision(
    dtype: str | torch.dtype | Precision | None = "auto", device: torch.device | str | None = None
) -> Precision:
    """Resolve ``dtype`` for ``device`` (``None``: the CPU).

    ``"auto"`` picks bf16 where :func:`fast_bf16` says so, fp32 otherwise. An explicit dtype (a
    ``torch.dtype`` or a name: ``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``)
    always wins; bf16 asked for on a CPU without native bf16 also emits a ``UserWarning``.
    ``None`` means fp32 (the checkpoint's weights as they are). A :class:`Precision` passes through.
    """
    if isinstance(dtype, Precision):
        return dtype
    if dtype is None:
        return Precision(torch.float32, "default")
    if isinstance(dtype, str) and dtype.lower() == "auto":
        fast, why = fast_bf16(device)
        return Precision(torch.bfloat16 if fast else torch.float32, f"auto: {why}")
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}: use auto or one of {sorted(DTYPE_NAMES)}")
        dtype = DTYPE_NAMES[dtype.lower()]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be 'auto', a name or a floating torch.dtype, got {dtype!r}")
    choice = Precision(dtype, "requested")
    if dtype == torch.bfloat16 and torch.device(device or "cpu").type == "cpu":
        fast, why = cpu_fast_bf16()
        if not fast:
            message = f"bfloat16 was requested but {why}; it may run many times slower than float32"
            warnings.warn(message, UserWarning, stacklevel=2)
            choice = Precision(dtype, "requested", message)
    return choice


def compile_support(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(can ``torch.compile``'s default backend build code for ``device`` here, why not): a C++ compiler
    for CPU code, Triton for CUDA."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    try:
        if dev.type == "cuda":
            from torch.utils._triton import has_triton

            return (True, "triton found") if has_triton() else (False, "triton is not installed")
        from torch._inductor.cpp_builder import get_cpp_compiler

        return True, f"C++ compiler {get_cpp_compiler()}"
    except Exception as err:  # inductor raises several kinds when no compiler is found
        return False, f"no C++ compiler for torch.compile ({type(err).__name__}: {err})".splitlines()[0]


# glibc's malloc returns freed memory to the kernel in two ways: a block of at least the mmap threshold
# (dynamic, 128 KiB to start) is its own mapping, unmapped when freed; and free memory at the top of the heap
# beyond the trim threshold (twice the mmap threshold) is released. A training step frees and allocates the
# same tensors every step, so each step faults its activations and gradients in again, page by page, with
# the kernel zeroing every page: at B/16 on a 2-core CPU that was 115k faults and 1.5 s of system time in a
# 5 s backward. Keeping freed memory (blocks below 32 MiB, glibc's largest threshold, from the heap; the
# heap's free top kept up to 1 GiB) removes most of it. The price: kept blocks do not always fit the next
# request, so the peak can grow (by 7 to 9% a rank at B/16 under ZeRO-2; unchanged at ZeRO-0).
GLIBC_MMAP_THRESHOLD = 32 * 2**20
GLIBC_TRIM_THRESHOLD = 2**30
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


@functools.lru_cache(maxsize=1)
def keep_freed_cpu_memory() -> str:
    """Make glibc's malloc keep freed memory for the next step instead of handing it back to the kernel
    (see the comment above), once per process; what was done, or why nothing was, as one line.

    Nothing changes where the user chose: ``VISION_TOWER_KEEP_FREED_MEMORY=0``, any of ``ALLOCATOR_ENV`` set
    (glibc's own tunables), another allocator in ``LD_PRELOAD``, or a C library that is not glibc (then
    there is no ``mallopt``)."""
    if os.environ.get("VISION_TOWER_KEEP_FREED_MEMORY", "1") == "0":
        return "allocator: as it comes (VISION_TOWER_KEEP_FREED_MEMORY=0)"
    chosen = [name for name in ALLOCATOR_ENV if name in os.environ]
    if chosen:
        return f"allocator: glibc malloc as set by {', '.join(chosen)}"
    preload = os.environ.get("LD_PRELOAD", "")
    other = next((name for name in OTHER_ALLOCATORS if name in preload), None)
    if other:
        return f"allocator: {other} (LD_PRELOAD)"
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "allocator: the C library's (not glibc), left as it is"
    version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (
        mallopt(_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
    ):
        return f"allocator: glibc {version().decode()} malloc, which refused the thresholds; left as it is"
    return (
        f"allocator: glibc {version().decode()} malloc keeps freed memory for reuse "
        f"(mmap threshold {GLIBC_MMAP_THRESHOLD >> 20} MiB, trim threshold {GLIBC_TRIM_THRESHOLD >> 30} GiB)"
    )
