"""The ``cpp`` backend: random bits, compare and scale in one vectorised C++ pass on CPU.

The source is ``csrc/mask_cpu.cpp`` beside this module (shipped in the wheel); this module builds
it on first use and calls it through :mod:`ctypes`.

The stream (see :mod:`hf_dropgrad.functional`, whose pure-torch reference this kernel matches bit
for bit): stream element ``e`` (element ``e - offset`` of a tensor that starts at global index
``offset``), chunk ``c = e // 4096``, ``r = e % 4096``, lane ``j = r // 1024``, ``b = r % 1024``,
reads the 16 bits ``(h >> 16 * j) & 0xFFFF`` of ``h = mix64(key + (c * 1024 + b + 1) * GOLDEN)``
(SplitMix64). It is kept when those bits are ``>= threshold`` and becomes ``round_to_dtype(float(g)
* (scale if kept else 0.0f))``, so a dropped inf/NaN still yields NaN. A chunk is processed in
blocks of 64 counters: 64 hashes into a small stack array (512 bytes per thread), then four
vectorised loops over the lanes ``j`` doing load/compare/select/multiply/store, while the next
chunk's block is prefetched. No full-size temporaries: one read and one write of every gradient.

Build: compiled lazily on first use with :func:`torch.utils.cpp_extension.load_inline` (5 s on an
idle 2-core machine, up to ~30 s on a busy one). Only ``ATen/Parallel.h`` and ``c10/util/Half.h``
are included and the entry points are plain ``extern "C"`` functions called through
:mod:`ctypes`: pybind11 and ``torch/extension.h`` alone take ~50 s to compile here. The library
is cached in torch's extensions directory (``TORCH_EXTENSIONS_DIR``) under a name holding a hash
of the source, flags and torch version, so a changed source rebuilds; two processes building at
once are serialised by torch's file baton (a lock left by a killed build is removed after 10
minutes, else every later process would wait on it forever).

Flags: ``-O3 -fopenmp`` for the baseline ISA, never ``-march=native`` (a cached build must run
on any machine that can load it, e.g. a shared home directory or a container image). The hot
loops are compiled twice, for the baseline and with ``__attribute__((target("avx2,f16c")))``,
and the AVX2 copy is chosen at run time with ``__builtin_cpu_supports``; both give identical
bits (fp16 NaNs are canonicalised to c10's portable ``sign | 0x7E00`` in the F16C path). On
Linux without OpenMP (``-fopenmp`` failing, e.g. clang without libomp) the build fails and the
pure-torch path is used; elsewhere (macOS) it is built without ``-fopenmp``, single-threaded.

Threads: one ``at::parallel_for`` (so ``torch.set_num_threads`` applies) over the chunks of *all*
tensors of a call, at least 8 chunks per task; calls with fewer than 64K elements in all run on
the calling thread. Python overhead is about 1 us per tensor.

Full update drop uses two more entry points, :func:`gather_dropped` and :func:`scatter_dropped`:
they regenerate the keep decisions chunk by chunk and pack (or put back) the values of the dropped
elements, copying raw bits of any 1/2/4/8-byte dtype; per-chunk counts and their prefix sums let
both run in parallel with no full-size mask.

Set ``HF_DROPGRAD_DISABLE_EXTENSION=1`` to skip the kernel (``load()`` then returns ``None``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from array import array
from collections.abc import Sequence
from pathlib import Path

import torch

from hf_dropgrad.kernels.checks import check_lengths, check_offset, check_offsets

__all__ = [
    "gather_dropped",
    "isa",
    "keep_mask",
    "load",
    "mask_",
    "num_chunks",
    "packable",
    "scatter_dropped",
    "unavailable_reason",
]

_RESOLUTION = 1 << 16
_CHUNK = 4096  # elements per chunk, kChunk in the C++ source
_MASK64 = (1 << 64) - 1
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DISABLE_ENV = "HF_DROPGRAD_DISABLE_EXTENSION"
_STALE_LOCK_S = 600.0

_SOURCE_PATH = Path(__file__).with_name("csrc") / "mask_cpu.cpp"

_CFLAGS = ["-O3", "-fopenmp"] if sys.platform.startswith("linux") else ["-O3"]
_LDFLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _source() -> str:
    return _SOURCE_PATH.read_text(encoding="utf-8")


def _extension_name() -> str:
    digest = hashlib.sha256(
        "\0".join([_source(), *_CFLAGS, *_LDFLAGS, torch.__version__]).encode()
    ).hexdigest()
    return f"hf_dropgrad_cpu_{digest[:16]}"


def _clear_stale_lock(lock: str) -> None:
    # torch's file baton waits forever on a lock left by a build that was killed; a real build
    # takes seconds to a minute, so a lock this old is stale.
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return
    if age > _STALE_LOCK_S:
        warnings.warn(
            f"hf_dropgrad: removing a stale build lock ({lock}, {age:.0f} s old)",
            RuntimeWarning,
            stacklevel=3,
        )
        with contextlib.suppress(OSError):
            os.remove(lock)


def _build() -> ctypes.CDLL:
    if sys.platform == "win32":
        raise RuntimeError("the kernel needs GCC or Clang; Windows is not supported")
    from torch.utils import cpp_extension

    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found (looked for {compiler!r}; set CXX)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    name = _extension_name()
    build_directory = cpp_extension._get_build_directory(name, verbose=False)
    _clear_stale_lock(os.path.join(build_directory, "lock"))
    path = cpp_extension.load_inline(
        name=name,
        build_directory=build_directory,
        cpp_sources=[_source()],
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        is_python_module=False,
        no_implicit_headers=True,
        verbose=False,
    )
    lib = ctypes.CDLL(path)
    i64, u64, u32, ptr = ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p
    lib.hfdg_mask.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.hfdg_mask.restype = None
    lib.hfdg_keep_mask.argtypes = [ptr, i64, i64, u64, u32]
    lib.hfdg_keep_mask.restype = None
    lib.hfdg_count_dropped.argtypes = [i64, i64, u64, u32, ptr]
    lib.hfdg_count_dropped.restype = i64
    lib.hfdg_gather_dropped.argtypes = [ptr, i64, i64, ctypes.c_int32, u64, u32, ptr, ptr]
    lib.hfdg_gather_dropped.restype = None
    lib.hfdg_scatter_dropped.argtypes = [ptr, i64, i64, ctypes.c_int32, u64, u32, ptr, ptr]
    lib.hfdg_scatter_dropped.restype = None
    lib.hfdg_isa.argtypes = []
    lib.hfdg_isa.restype = ctypes.c_int
    lib.hfdg_set_isa.argtypes = [ctypes.c_int]
    lib.hfdg_set_isa.restype = ctypes.c_int
    return lib


def load() -> ctypes.CDLL | None:
    """Build (first call only) and load the kernel; ``None`` if it cannot be used.

    A build failure (no compiler, no ninja, a compile error) is reported once with
    :func:`warnings.warn` and remembered, so later calls return ``None`` at once.
    ``HF_DROPGRAD_DISABLE_EXTENSION=1`` makes it return ``None`` without building or warning.
    """
    global _lib, _error
    if os.environ.get(_DISABLE_ENV, "") == "1":
        return None
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except Exception as exc:  # any failure means "use the pure-torch path"
                reason = " ".join(str(exc).split())
                if len(reason) > 600:
                    reason = reason[:200] + " ... " + reason[-400:]
                _error = f"{type(exc).__name__}: {reason}"
                warnings.warn(
                    "hf_dropgrad: the fused CPU masking kernel is unavailable, falling back to "
                    f"the slower pure-torch path ({_error}). Set {_DISABLE_ENV}=1 to skip it.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _lib


def unavailable_reason() -> str | None:
    """Why :func:`load` returns ``None`` (``None`` when the kernel is loaded or not tried yet)."""
    if os.environ.get(_DISABLE_ENV, "") == "1":
        return f"{_DISABLE_ENV}=1"
    return _error


def _require() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError(
            f"the hf_dropgrad CPU kernel is unavailable ({_error or _DISABLE_ENV + '=1'})"
        )
    return lib


def _check_threshold(threshold: int) -> int:
    t = int(threshold)
    if not 0 <= t <= _RESOLUTION:
        raise ValueError(f"threshold must be in [0, {_RESOLUTION}], got {threshold}")
    return t


def isa() -> str | None:
    """The code path in use: ``"avx2"``, ``"portable"``, or ``None`` without the kernel."""
    lib = load()
    if lib is None:
        return None
    return "avx2" if lib.hfdg_isa() else "portable"


def _set_isa(avx2: bool) -> bool:
    """Choose the AVX2 (if the CPU has it) or the portable path; returns whether AVX2 is on."""
    return bool(_require().hfdg_set_isa(int(avx2)))


def mask_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
) -> None:
    """Mask every gradient in place with one call of the fused kernel.

    Args:
        grads: contiguous CPU tensors, float32/bfloat16/float16, not overlapping one another
            (they are masked in parallel). Written through their data pointers, so autograd's
            version counters do not move: do not pass tensors saved by a recorded graph.
        keys: one stream key per tensor, an int taken modulo ``2**64``.
        thresholds: drop thresholds in ``[0, 65536]`` (drop probability ``t / 65536``).
        scales: factor of kept elements (``65536 / (65536 - t)``), rounded to float32.
            A tensor with ``threshold == 0`` and ``scale == 1.0`` is left untouched.
        offsets: global stream index of each tensor's first element (default 0 each).
    """
    lib = _require()
    n = check_lengths(grads, keys, thresholds, scales)
    offs = check_offsets(offsets, n)
    if n == 0:
        return
    # Packed with array.array (C loops), not per-item ctypes: ~1 us per tensor in all.
    dtypes = array("i", [_DTYPE_CODES.get(g.dtype, -1) for g in grads])
    if -1 in dtypes or not all(
        g.is_cpu and g.layout is torch.strided and g.is_contiguous() for g in grads
    ):
        _raise_bad_grad(grads)
    thr = [int(t) for t in thresholds]
    if min(thr) < 0 or max(thr) > _RESOLUTION:
        bad = next(t for t in thr if not 0 <= t <= _RESOLUTION)
        raise ValueError(f"threshold must be in [0, {_RESOLUTION}], got {bad}")
    ptrs = array("Q", [g.data_ptr() for g in grads])
    numels = array("q", [g.numel() for g in grads])
    offs_arr = array("q", offs)
    keys_arr = array("Q", [int(k) & _MASK64 for k in keys])
    thr_arr = array("I", thr)
    scale_arr = array("f", [float(s) for s in scales])  # C double -> float rounding
    lib.hfdg_mask(
        n,
        ptrs.buffer_info()[0],
        numels.buffer_info()[0],
        offs_arr.buffer_info()[0],
        dtypes.buffer_info()[0],
        keys_arr.buffer_info()[0],
        thr_arr.buffer_info()[0],
        scale_arr.buffer_info()[0],
    )


def _raise_bad_grad(grads: Sequence[torch.Tensor]) -> None:
    for i, g in enumerate(grads):
        if g.dtype not in _DTYPE_CODES or not g.is_cpu or g.layout is not torch.strided:
            raise ValueError(
                f"grads[{i}] must be a dense CPU float32/bfloat16/float16 tensor, "
                f"got {g.dtype} {g.layout} on {g.device}"
            )
        if not g.is_contiguous():
            raise ValueError(f"grads[{i}] must be contiguous")


def keep_mask(
    numel: int, key: int, threshold: int, *, out: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """Keep decisions (``True`` = kept) of stream elements ``offset .. offset + numel - 1``.

    ``out`` (a contiguous bool CPU tensor of ``numel`` elements, any shape) is filled and returned
    instead of a new tensor: reusing one saves the page faults of a fresh allocation, which cost
    more than the kernel itself (60.5M elements, one thread: 40 ms into a reused buffer, ~95 ms
    into a new one).
    """
    lib = _require()
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    t = _check_threshold(threshold)
    offset = check_offset(offset)
    if out is None:
        out = torch.empty(numel, dtype=torch.bool)
    elif not (
        out.dtype == torch.bool and out.is_cpu and out.is_contiguous() and out.numel() == numel
    ):
        raise ValueError(
            f"out must be a contiguous bool CPU tensor of {numel} elements, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if numel:
        lib.hfdg_keep_mask(out.data_ptr(), numel, offset, int(key) & _MASK64, t)
    return out


def packable(tensor: torch.Tensor) -> bool:
    """Whether :func:`gather_dropped` / :func:`scatter_dropped` take ``tensor``.

    A plain (exact-type: subclasses such as DTensor do not own plain storage) contiguous dense
    CPU tensor with 1-, 2-, 4- or 8-byte elements; the values are moved as raw bits.
    """
    return (
        type(tensor) is torch.Tensor
        and tensor.is_cpu
        and tensor.layout is torch.strided
        and tensor.is_contiguous()
        and tensor.element_size() in (1, 2, 4, 8)
    )


def _check_packable(tensor: torch.Tensor) -> None:
    if not packable(tensor):
        raise ValueError(
            f"tensor must be a plain contiguous dense CPU tensor with 1-, 2-, 4- or 8-byte "
            f"elements, got {type(tensor).__name__} {tensor.dtype} {tensor.layout} on "
            f"{tensor.device}"
        )


def num_chunks(numel: int, offset: int = 0) -> int:
    """Number of 4096-element stream chunks that elements ``offset .. offset + numel - 1`` touch."""
    if numel <= 0:
        return 0
    return (offset + numel - 1) // _CHUNK - offset // _CHUNK + 1


def gather_dropped(
    tensor: torch.Tensor, key: int, threshold: int, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The elements of ``tensor`` the stream drops, packed in order, with their chunk offsets.

    Returns ``(values, offsets)``: ``values`` is a 1-D tensor of ``tensor.dtype`` equal to
    ``tensor.flatten()[~keep_mask(..., offset=offset)]``; ``offsets`` (int64, one per stream chunk
    the tensor touches, plus one) locate each chunk's values and are what
    :func:`scatter_dropped` needs to put them back.
    Made without a full-size mask: the keep decisions are regenerated chunk by chunk.
    """
    lib = _require()
    _check_packable(tensor)
    t = _check_threshold(threshold)
    offset = check_offset(offset)
    n = tensor.numel()
    key = int(key) & _MASK64
    offsets = torch.empty(num_chunks(n, offset) + 1, dtype=torch.int64)
    total = lib.hfdg_count_dropped(n, offset, key, t, offsets.data_ptr())
    values = torch.empty(total, dtype=tensor.dtype)
    if total:
        lib.hfdg_gather_dropped(
            tensor.data_ptr(), n, offset, tensor.element_size(), key, t, offsets.data_ptr(),
            values.data_ptr(),
        )
    return values, offsets


def scatter_dropped(
    tensor: torch.Tensor,
    key: int,
    threshold: int,
    values: torch.Tensor,
    offsets: torch.Tensor,
    offset: int = 0,
) -> None:
    """Write ``values`` back into the dropped elements of ``tensor`` (see :func:`gather_dropped`).

    Kept elements are not touched. ``values`` and ``offsets`` must come from
    :func:`gather_dropped` with the same ``key``, ``threshold``, ``offset`` and number of
    elements.
    """
    lib = _require()
    _check_packable(tensor)
    t = _check_threshold(threshold)
    offset = check_offset(offset)
    n = tensor.numel()
    chunks = num_chunks(n, offset)
    if offsets.dtype != torch.int64 or not offsets.is_contiguous() or offsets.numel() != chunks + 1:
        raise ValueError(f"offsets must be a contiguous int64 tensor of {chunks + 1} elements")
    if values.dtype != tensor.dtype or not values.is_contiguous() or not values.is_cpu or (
        values.numel() != int(offsets[-1])
    ):
        raise ValueError(
            f"values must be a contiguous CPU {tensor.dtype} tensor of {int(offsets[-1])} "
            f"elements, got {values.dtype} {tuple(values.shape)} on {values.device}"
        )
    if values.numel():
        lib.hfdg_scatter_dropped(
            tensor.data_ptr(), n, offset, tensor.element_size(), int(key) & _MASK64, t,
            offsets.data_ptr(), values.data_ptr(),
        )
