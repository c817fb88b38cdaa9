"""The stream straight from its definition (pure Python and numpy), the oracle of every backend.

Stream element ``e`` (a global index) lies in chunk ``c = e // 4096`` at ``r = e % 4096``, lane
``j = r // 1024``, counter ``b = r % 1024``; its 16 bits are ``(h >> 16 * j) & 0xFFFF`` of
``h = mix64(key + (c * 1024 + b + 1) * GOLDEN)``. A kept element becomes
``round(float32(g) * float32(scale))``, a dropped one ``round(float32(g) * 0)``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

GOLDEN = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1

NUMELS = [1, 1023, 4096, 4097, 100003]
KEYS = [0, 7, 2**63 - 1, 2**63, 2**64 - 1, 0xDEADBEEF_CAFEF00D]
THRESHOLDS = [0, 1, 6554, 32768, 65535, 65536]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PACK_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8]


def scale(t: int) -> float:
    return 0.0 if t >= 65536 else 65536 / (65536 - t)


# ----------------------------------------------------------------------------- oracles
def python_bits(key: int, e: int) -> int:
    """The 16 random bits of element ``e``, straight from the definition (pure Python)."""
    c, r = divmod(e, 4096)
    j, b = divmod(r, 1024)
    z = (key + (c * 1024 + b + 1) * GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * M1) & MASK64
    z = ((z ^ (z >> 27)) * M2) & MASK64
    z ^= z >> 31
    return (z >> (16 * j)) & 0xFFFF


@functools.lru_cache(maxsize=64)
def numpy_bits(key: int, numel: int, offset: int = 0) -> np.ndarray:
    """The same bits for elements ``offset .. offset + numel - 1`` (numpy, uint64 wraps)."""
    return numpy_bits_at(key, np.arange(offset, offset + numel, dtype=np.uint64))


def indices(numel: int, offset: int = 0, run: int | None = None, stride: int = 0) -> np.ndarray:
    """Stream indices of the elements of a tensor at ``offset`` in runs of ``run`` (stride
    ``stride``; ``None``: one run), in local order."""
    j = np.arange(numel, dtype=np.uint64)
    if run is None or run >= numel:
        return j + np.uint64(offset)
    return (j // np.uint64(run)) * np.uint64(stride) + j % np.uint64(run) + np.uint64(offset)


def chunk_bounds(numel: int, offset: int = 0, run: int | None = None, stride: int = 0
                 ) -> list[tuple[int, int]]:
    """``[lo, hi)`` local bounds of every chunk of the numbering (run by run, then stream
    chunks within a run) of such a tensor."""
    run = numel if run is None or run >= numel else run
    out = []
    for r in range(numel // run if numel else 0):
        at = offset + r * stride
        for c in range(at // 4096, (at + run - 1) // 4096 + 1):
            lo, hi = max(at, c * 4096) - at, min(at + run, (c + 1) * 4096) - at
            out.append((r * run + lo, r * run + hi))
    return out


def numpy_bits_at(key: int, e: np.ndarray) -> np.ndarray:
    """The bits of the stream elements whose (uint64) indices ``e`` holds."""
    c, r = e // np.uint64(4096), e % np.uint64(4096)
    j, b = r // np.uint64(1024), r % np.uint64(1024)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (c * np.uint64(1024) + b + np.uint64(1)) * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(M2)
    z = z ^ (z >> np.uint64(31))
    return ((z >> (np.uint64(16) * j)) & np.uint64(0xFFFF)).astype(np.int64)


def bf16_bits_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(f: np.ndarray) -> np.ndarray:
    """c10::BFloat16(float): round to nearest even; NaNs are compared separately."""
    u = f.view(np.uint32).astype(np.uint64)
    return ((u + ((u >> np.uint64(16)) & np.uint64(1)) + np.uint64(0x7FFF)) >> np.uint64(16)) & (
        np.uint64(0xFFFF)
    )


def expected(
    g: torch.Tensor, key: int, t: int, scale: float, offset: int = 0, run: int | None = None,
    stride: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(bit pattern, NaN mask) of ``g`` (CPU) masked by the definition (at ``offset``, in runs
    of ``run`` with stride ``stride`` when given)."""
    g = g.reshape(-1)
    bits = numpy_bits_at(key, indices(g.numel(), offset, run, stride))
    factor = np.where(bits >= t, np.float32(scale), np.float32(0.0))
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 and fp16 overflow are intended
        return expected_bits(g, factor)


def expected_bits(g: torch.Tensor, factor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if g.dtype == torch.float32:
        out = g.numpy() * factor
        return out.view(np.uint32).astype(np.uint64), np.isnan(out)
    if g.dtype == torch.bfloat16:
        out = bf16_bits_to_f32(g.view(torch.int16).numpy().view(np.uint16)) * factor
        return f32_to_bf16_bits(out), np.isnan(out)
    out = (g.numpy().astype(np.float32) * factor).astype(np.float16)  # IEEE round to nearest even
    return out.view(np.uint16).astype(np.uint64), np.isnan(out)


def bits(g: torch.Tensor) -> np.ndarray:
    """The bit patterns of a float32/bfloat16/float16 CPU tensor, as uint64."""
    if g.dtype == torch.float32:
        return g.view(torch.int32).numpy().view(np.uint32).astype(np.uint64)
    return g.view(torch.int16).numpy().view(np.uint16).astype(np.uint64)


def grad(numel: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values over many magnitudes (subnormal to overflowing fp16), plus inf/NaN."""
    gen = torch.Generator().manual_seed(seed)
    mag = torch.pow(10.0, torch.empty(numel).uniform_(-9, 6, generator=gen))
    g = (torch.randn(numel, generator=gen) * mag).to(dtype)
    special = [float("inf"), float("-inf"), float("nan"), -0.0, 0.0]
    for i, v in enumerate(special):
        if numel > 5 * i + 3:
            g[5 * i + 3] = v
    return g


def assert_matches(got: torch.Tensor, want: tuple[np.ndarray, np.ndarray], msg: str) -> None:
    """``got`` (any device) has the wanted bits, NaN payloads aside."""
    want_bits, nan = want
    got = got.cpu().reshape(-1)
    assert np.array_equal(torch.isnan(got).numpy(), nan), msg
    assert np.array_equal(bits(got)[~nan], want_bits[~nan]), msg




def raw(t: torch.Tensor) -> torch.Tensor:
    """The bits of ``t`` as integers, so NaN payloads compare exactly."""
    itype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(itype)


def filled(numel: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-128, 128, (numel * torch.empty((), dtype=dtype).element_size(),),
                         dtype=torch.int8, generator=gen)
    return bits.view(dtype)  # every bit pattern, NaNs and infs included


def assert_same(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """Same bits, except that NaNs only have to be NaN in both (payloads differ across paths)."""
    got, want = got.cpu(), want.cpu()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), msg
    assert torch.equal(raw(got)[~nan], raw(want)[~nan]), msg
