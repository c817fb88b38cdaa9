"""The ``cpp`` backend: random bits, compare and scale in one vectorised C++ pass on CPU.

The source is ``csrc/mask_cpu.cpp`` beside this module (shipped in the wheel). It is the CPU
implementation of the ``hf_dropgrad::`` torch ops (:mod:`hf_dropgrad.kernels.ops` defines their
schemas, and its Python functions are the backend protocol): its ``TORCH_LIBRARY_IMPL(hf_dropgrad,
CPU, m)`` block registers the kernels with the dispatcher when :func:`load` builds and loads the
library, after which CPU tensors passed to the ops run them. The kernels check their own
arguments (``TORCH_CHECK_VALUE``: a ``ValueError`` naming the argument). This module only builds
and loads the library and chooses its code path (:func:`isa`).

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

Runs (a tensor holding several runs of the stream, e.g. a column shard: see
:mod:`hf_dropgrad.kernels.checks`) are expanded into one segment per run inside the kernel, so a
run costs what a contiguous tensor of its length costs; the chunks are numbered run by run.

Full update drop uses ``gather_dropped_many`` and ``scatter_dropped_many``, over all the
tensors of one element size at once: a counting pass (hashes only, no tensor memory read; the
decisions of 64 positions become one word of "dropped" bits, and a popcount counts them) gives
the dropped elements of every chunk, their prefix sums say where each chunk's values go, and a
move pass regenerates each chunk's bits and copies only the dropped elements (a bit scan), as
raw bits of any 1/2/4/8-byte dtype. Both run in parallel over the chunks of all the tensors,
with no full-size mask: the values (``p`` times the bytes) and one int64 per chunk.
``mask_counted_`` masks gradients and also writes those chunk starts, counted from the hashes
the mask makes anyway (a compare and a subtract per 8 stream values), and
``gather_dropped_at`` packs with starts so given. ``mask_gather_dropped_`` does both in
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
from pathlib import Path

import torch

__all__ = ["isa", "load", "unavailable_reason"]

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
    # The library implements the ops whose schemas hf_dropgrad.kernels.ops defines; the
    # package's __init__ imports ops first, so they exist before anything can call load().
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
