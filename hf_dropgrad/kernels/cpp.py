"""The ``cpp`` backend: random bits, compare and scale in one vectorised C++ pass on CPU.

The source is ``csrc/mask_cpu.cpp`` beside this module (shipped in the wheel). It is the CPU
implementation of the ``hf_dropgrad::`` torch ops (:mod:`hf_dropgrad.kernels.ops` defines their
schemas): its ``TORCH_LIBRARY_IMPL(hf_dropgrad, CPU, m)`` block registers the kernels with the
dispatcher when :func:`load` builds and loads the library, after which CPU tensors passed to the
ops run them. The functions below check their arguments (``ValueError`` naming the argument) and
call the ops.

The stream (see :mod:`hf_dropgrad.kernels.stream`; the pure-torch reference matches this kernel
bit for bit): stream element ``e`` (element ``e - offset`` of a tensor that starts at global index
``offset``), chunk ``c = e // 4096``, ``r = e % 4096``, lane ``j = r // 1024``, ``b = r % 1024``,
reads the 16 bits ``(h >> 16 * j) & 0xFFFF`` of ``h = mix64(key + (c * 1024 + b + 1) * GOLDEN)``
(SplitMix64). It is kept when those bits are ``>= threshold`` and becomes ``round_to_dtype(float(g)
* (scale if kept else 0.0f))``, so a dropped inf/NaN still yields NaN. A chunk is processed in
blocks of 64 counters: 64 hashes into a small stack array (512 bytes per thread), then four
vectorised loops over the lanes ``j`` doing load/compare/select/multiply/store, while the next
chunk's block is prefetched. No full-size temporaries: one read and one write of every gradient.

Build: on first use, with :func:`torch.utils.cpp_extension.load` (``is_python_module=False``:
the library only registers ops, so pybind11 and ``torch/extension.h`` are not compiled; about
20-40 s on an idle 2-core machine, longer on a busy one). It is cached under torch's extensions
directory (``TORCH_EXTENSIONS_DIR``) in a folder named with a hash of the source, flags and torch
version, so a changed source rebuilds; two processes building at once are serialised by torch's
file lock in that folder (a lock left by a killed build is removed after 10 minutes, else every
later process would wait on it forever).

Flags: ``-O3 -fopenmp`` for the baseline ISA, never ``-march=native`` (a cached build must run
on any machine that can load it, e.g. a shared home directory or a container image). The hot
loops are compiled three times, for the baseline, with ``__attribute__((target("avx2,f16c")))``
and with AVX-512 (F, DQ, BW, VL) added, and the best copy the CPU runs is chosen at run time with
``__builtin_cpu_supports`` (:func:`isa` names it). AVX-512 gains mostly in the hash: its 64-bit
lane multiply (``vpmullq``) does 8 SplitMix64 hashes at once, which AVX2 can only emulate. All
three give identical bits (fp16 NaNs are canonicalised to c10's portable ``sign | 0x7E00`` in the
F16C path; bf16 NaNs become ``0x7FC0`` in every path); the tests run each path. On
Linux without OpenMP (``-fopenmp`` failing, e.g. clang without libomp) the build fails and the
pure-torch path is used; elsewhere (macOS) it is built without ``-fopenmp``, single-threaded.

Threads: one ``at::parallel_for`` (so ``torch.set_num_threads`` applies) over the chunks of *all*
tensors of a call, at least 8 chunks per task; calls with fewer than 64K elements in all run on
the calling thread.

Full update drop uses :func:`gather_dropped_many` and :func:`scatter_dropped_many`, over all the
tensors of one element size at once: a counting pass (hashes only, no tensor memory read; the
decisions of 64 positions become one word of "dropped" bits, and a popcount counts them) gives
the dropped elements of every chunk, their prefix sums say where each chunk's values go, and a
move pass regenerates each chunk's bits and copies only the dropped elements (a bit scan), as
raw bits of any 1/2/4/8-byte dtype. Both run in parallel over the chunks of all the tensors,
with no full-size mask: the values (``p`` times the bytes) and one int64 per chunk.
:func:`mask_counted_` masks gradients and also writes those chunk starts, counted from the hashes
the mask makes anyway (a compare and a subtract per 8 stream values), and
:func:`gather_dropped_at` packs with starts so given. :func:`mask_gather_dropped_` does both in
one pass (the parameters' dropped elements are the gradients'): each chunk's hashes mask the
gradient and pick the parameter's dropped elements, which go to the calling thread's region of
the values (sized from its expected count); DropGrad's full update drop uses it, two hashing
passes per step with the restore.

Set ``HF_DROPGRAD_DISABLE_EXTENSION=1`` to skip the kernel (``load()`` then returns ``None``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from hf_dropgrad.kernels import ops
from hf_dropgrad.kernels.checks import check_lengths, check_offset, check_offsets
from hf_dropgrad.kernels.ops import num_chunks

__all__ = [
    "gather_dropped",
    "gather_dropped_at",
    "gather_dropped_many",
    "isa",
    "keep_mask",
    "load",
    "mask_",
    "mask_counted_",
    "mask_gather_dropped_",
    "num_chunks",
    "packable",
    "scatter_dropped",
    "scatter_dropped_many",
    "unavailable_reason",
]

_RESOLUTION = 1 << 16
_MASK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DISABLE_ENV = "HF_DROPGRAD_DISABLE_EXTENSION"
_STALE_LOCK_S = 600.0

_SOURCE_PATH = Path(__file__).with_name("csrc") / "mask_cpu.cpp"

_CFLAGS = ["-O3", "-fopenmp"] if sys.platform.startswith("linux") else ["-O3"]
_LDFLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []

_lock = threading.Lock()
_lib: str | None = None  # the loaded library's path
_error: str | None = None


def _source() -> str:
    return _SOURCE_PATH.read_text(encoding="utf-8")


def _extension_name() -> str:
    digest = hashlib.sha256(
        "\0".join([_source(), *_CFLAGS, *_LDFLAGS, torch.__version__]).encode()
    ).hexdigest()
    return f"hf_dropgrad_cpu_{digest[:16]}"


def _build_directory(name: str) -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils import cpp_extension

        root = os.path.join(cpp_extension.get_default_build_root(), "hf_dropgrad")
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


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


def _build() -> str:
    """Compile (or find the cached build of) ``csrc/mask_cpu.cpp`` and load it into torch.ops."""
    if sys.platform == "win32":
        raise RuntimeError("the kernel needs GCC or Clang; Windows is not supported")
    from torch.utils import cpp_extension

    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found (looked for {compiler!r}; set CXX)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    name = _extension_name()
    build_directory = _build_directory(name)
    _clear_stale_lock(os.path.join(build_directory, "lock"))
    # is_python_module=False: the library is loaded with torch.ops.load_library, and its
    # TORCH_LIBRARY_IMPL block registers the CPU kernels of the ops.
    return cpp_extension.load(
        name=name,
        sources=[str(_SOURCE_PATH)],
        build_directory=build_directory,
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        is_python_module=False,
        verbose=False,
    )


def load() -> str | None:
    """Build (first call only) and load the kernel; ``None`` if it cannot be used.

    Returns the loaded library's path. A build failure (no compiler, no ninja, a compile error)
    is reported once with :func:`warnings.warn` and remembered, so later calls return ``None`` at
    once. ``HF_DROPGRAD_DISABLE_EXTENSION=1`` makes it return ``None`` without building or
    warning.
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


def _require() -> None:
    if load() is None:
        raise RuntimeError(
            f"the hf_dropgrad CPU kernel is unavailable ({_error or _DISABLE_ENV + '=1'})"
        )


def _check_thresholds(thresholds: Sequence[int]) -> list[int]:
    out = [int(t) for t in thresholds]
    for t in out:
        if not 0 <= t <= _RESOLUTION:
            raise ValueError(f"threshold must be in [0, {_RESOLUTION}], got {t}")
    return out


_ISAS = ("portable", "avx2", "avx512")  # the kernel's code paths, by its numbering


def isa() -> str | None:
    """The code path in use: ``"avx512"``, ``"avx2"``, ``"portable"``, or ``None`` without the
    kernel."""
    if load() is None:
        return None
    return _ISAS[torch.ops.hf_dropgrad._cpu_isa(-1)]


def _isas() -> list[str]:
    """The code paths this CPU runs, best first (empty without the kernel)."""
    if load() is None:
        return []
    in_use = torch.ops.hf_dropgrad._cpu_isa(-1)
    best = torch.ops.hf_dropgrad._cpu_isa(len(_ISAS))  # selects the best
    torch.ops.hf_dropgrad._cpu_isa(in_use)
    return list(reversed(_ISAS[: best + 1]))


def _set_isa(name: str) -> str:
    """Choose a code path (``"portable"``, ``"avx2"``, ``"avx512"``: the best the CPU runs if it
    cannot run that one); returns the one in use."""
    if name not in _ISAS:
        raise ValueError(f"isa must be one of {', '.join(_ISAS)}, got {name!r}")
    _require()
    return _ISAS[torch.ops.hf_dropgrad._cpu_isa(_ISAS.index(name))]


def mask_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
) -> None:
    """Mask every gradient in place with one call of the fused kernel (``hf_dropgrad::mask_``).

    Args:
        grads: contiguous CPU tensors, float32/bfloat16/float16, not overlapping one another
            (they are masked in parallel).
        keys: one stream key per tensor, an int taken modulo ``2**64``.
        thresholds: drop thresholds in ``[0, 65536]`` (drop probability ``t / 65536``).
        scales: factor of kept elements (``65536 / (65536 - t)``), rounded to float32.
            A tensor with ``threshold == 0`` and ``scale == 1.0`` is left untouched.
        offsets: global stream index of each tensor's first element (default 0 each).
    """
    _require()
    n = check_lengths(grads, keys, thresholds, scales)
    offs = check_offsets(offsets, n)
    if n == 0:
        return
    if not all(
        g.dtype in _MASK_DTYPES and g.is_cpu and g.layout is torch.strided and g.is_contiguous()
        for g in grads
    ):
        _raise_bad_grad(grads)
    ops.mask_(grads, keys, _check_thresholds(thresholds), scales, offs)


def _check_starts(starts: torch.Tensor, chunks: int) -> None:
    if (
        starts.dtype != torch.int64
        or not starts.is_contiguous()
        or not starts.is_cpu
        or starts.numel() != chunks + 1
    ):
        raise ValueError(
            f"starts must be a contiguous int64 CPU tensor of {chunks + 1} elements, got "
            f"{starts.dtype} {tuple(starts.shape)} on {starts.device}"
        )


def mask_counted_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None,
    starts: torch.Tensor,
) -> None:
    """:func:`mask_` that also fills ``starts`` (``hf_dropgrad::mask_counted_``).

    ``starts`` (a contiguous int64 CPU tensor of one element per stream chunk of the gradients,
    plus one) receives what :func:`gather_dropped_many` returns as ``starts`` for tensors of the
    gradients' sizes, keys, thresholds and offsets, whatever their scales.
    """
    _require()
    n = check_lengths(grads, keys, thresholds, scales)
    offs = check_offsets(offsets, n)
    if not all(
        g.dtype in _MASK_DTYPES and g.is_cpu and g.layout is torch.strided and g.is_contiguous()
        for g in grads
    ):
        _raise_bad_grad(grads)
    _check_starts(starts, sum(num_chunks(g.numel(), o) for g, o in zip(grads, offs)))
    ops.mask_counted_(grads, keys, _check_thresholds(thresholds), scales, offs, starts)


def _raise_bad_grad(grads: Sequence[torch.Tensor]) -> None:
    for i, g in enumerate(grads):
        if g.dtype not in _MASK_DTYPES or not g.is_cpu or g.layout is not torch.strided:
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
    _require()
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    (t,) = _check_thresholds([threshold])
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
        ops.keep_mask_(out, key, t, offset)
    return out


def packable(tensor: torch.Tensor) -> bool:
    """Whether :func:`gather_dropped_many` / :func:`scatter_dropped_many` take ``tensor``.

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


def _check_pack_args(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
) -> tuple[list[int], list[int]]:
    n = len(tensors)
    if not len(keys) == len(thresholds) == n:
        raise ValueError(
            f"tensors, keys and thresholds differ in length: {n}, {len(keys)}, {len(thresholds)}"
        )
    offs = check_offsets(offsets, n)
    for i, x in enumerate(tensors):
        if not packable(x):
            raise ValueError(
                f"tensors[{i}] must be a plain contiguous dense CPU tensor with 1-, 2-, 4- or "
                f"8-byte elements, got {type(x).__name__} {x.dtype} {x.layout} on {x.device}"
            )
        if x.element_size() != tensors[0].element_size():
            raise ValueError(
                f"tensors must share one element size: tensors[{i}] is {x.dtype}, tensors[0] "
                f"{tensors[0].dtype}"
            )
    return _check_thresholds(thresholds), offs


def gather_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The elements of every tensor that the stream drops, packed in order, and chunk starts.

    Returns ``(values, starts)``: ``values`` is a 1-D tensor of ``tensors[0].dtype`` equal to
    ``torch.cat([t.flatten()[~keep_i] for t in tensors])``; ``starts`` (int64, one per stream
    chunk of the tensors, tensor 0's first, plus the total) says where each chunk's values begin,
    and is what :func:`scatter_dropped_many` needs to put them back. The tensors share one element
    size. Made without a full-size mask: the keep decisions are regenerated chunk by chunk.
    """
    _require()
    thr, offs = _check_pack_args(tensors, keys, thresholds, offsets)
    return ops.gather_dropped_many(tensors, keys, thr, offs)


def gather_dropped_at(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    starts: torch.Tensor,
) -> torch.Tensor:
    """The ``values`` of :func:`gather_dropped_many`, packed at the chunk starts ``starts`` (from
    :func:`mask_counted_` with the same keys, thresholds, offsets and sizes): no counting pass.
    """
    _require()
    thr, offs = _check_pack_args(tensors, keys, thresholds, offsets)
    _check_starts(starts, sum(num_chunks(x.numel(), o) for x, o in zip(tensors, offs)))
    return ops.gather_dropped_at(tensors, keys, thr, offs, starts)


def mask_gather_dropped_(
    grads: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mask_` of ``grads`` and :func:`gather_dropped_many` of ``tensors`` in one hashing
    pass (``hf_dropgrad::mask_gather_dropped_``); returns ``(values, starts)``.

    ``tensors[i]`` is the parameter of ``grads[i]``: a contiguous CPU tensor of its size and
    element size (all of one dtype), sharing no memory with the gradients. Each thread packs its
    chunks into a buffer of its own, copied into ``values`` at the end: the values are held
    twice for a moment.
    """
    _require()
    n = check_lengths(grads, keys, thresholds, scales)
    offs = check_offsets(offsets, n)
    if len(tensors) != n:
        raise ValueError(f"grads and tensors differ in length: {n}, {len(tensors)}")
    if not all(
        g.dtype in _MASK_DTYPES and g.is_cpu and g.layout is torch.strided and g.is_contiguous()
        for g in grads
    ):
        _raise_bad_grad(grads)
    for i, (g, x) in enumerate(zip(grads, tensors)):
        if not (x.is_cpu and x.layout is torch.strided and x.is_contiguous()):
            raise ValueError(f"tensors[{i}] must be a contiguous dense CPU tensor")
        if x.numel() != g.numel() or x.element_size() != g.element_size():
            raise ValueError(
                f"tensors[{i}] must have grads[{i}]'s size and element size: {x.numel()} x "
                f"{x.element_size()} bytes against {g.numel()} x {g.element_size()}"
            )
        if x.dtype != tensors[0].dtype:
            raise ValueError(
                f"tensors must share one dtype: tensors[{i}] is {x.dtype}, tensors[0] "
                f"{tensors[0].dtype}"
            )
    thr = _check_thresholds(thresholds)
    return ops.mask_gather_dropped_(grads, tensors, keys, thr, scales, offs)


def scatter_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    values: torch.Tensor,
    starts: torch.Tensor,
) -> None:
    """Write ``values`` back into the dropped elements of every tensor; kept ones are untouched.

    ``values`` and ``starts`` must come from :func:`gather_dropped_many` with the same keys,
    thresholds, offsets and sizes.
    """
    _require()
    thr, offs = _check_pack_args(tensors, keys, thresholds, offsets)
    chunks = sum(num_chunks(x.numel(), o) for x, o in zip(tensors, offs))
    if (
        starts.dtype != torch.int64
        or not starts.is_contiguous()
        or not starts.is_cpu
        or starts.numel() != chunks + 1
    ):
        raise ValueError(f"starts (offsets) must be a contiguous int64 tensor of {chunks + 1} "
                         "elements")
    total = int(starts[-1])
    if (
        (tensors and values.element_size() != tensors[0].element_size())
        or not values.is_contiguous()
        or not values.is_cpu
        or values.numel() != total
    ):
        want = tensors[0].dtype if tensors else "any"
        raise ValueError(
            f"values must be a contiguous CPU {want} tensor of {total} elements, got "
            f"{values.dtype} {tuple(values.shape)} on {values.device}"
        )
    ops.scatter_dropped_many(tensors, keys, thr, offs, values, starts)


def gather_dropped(
    tensor: torch.Tensor, key: int, threshold: int, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_dropped_many` of one tensor."""
    return gather_dropped_many([tensor], [key], [threshold], [offset])


def scatter_dropped(
    tensor: torch.Tensor,
    key: int,
    threshold: int,
    values: torch.Tensor,
    offsets: torch.Tensor,
    offset: int = 0,
) -> None:
    """:func:`scatter_dropped_many` of one tensor (``offsets``: the chunk starts)."""
    scatter_dropped_many([tensor], [key], [threshold], [offset], values, offsets)
