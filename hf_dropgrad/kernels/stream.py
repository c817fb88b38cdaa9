"""Constants of the counter-based stream, shared by :mod:`hf_dropgrad.functional` and every backend.

Stream element ``e`` (a global index: the element's position in the full, unsharded parameter)
lies in chunk ``c = e // CHUNK`` at ``r = e % CHUNK``, lane ``j = r // WIDTH``, counter
``b = r % WIDTH``; its 16 random bits are ``(h >> 16 * j) & 0xFFFF`` of the SplitMix64 output
``h = mix64(key + (c * WIDTH + b + 1) * GOLDEN)``.
"""

from __future__ import annotations

__all__ = ["CHUNK", "GOLDEN", "M1", "M2", "MASK64", "RESOLUTION", "WIDTH", "signed64"]

GOLDEN = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1

#: Random bits per element; the drop probability is a multiple of 1 / RESOLUTION.
RESOLUTION = 1 << 16
#: Elements per chunk of the stream, and hashes (counters) per chunk.
CHUNK = 4096
WIDTH = 1024


def signed64(x: int) -> int:
    """``x mod 2**64`` as a signed int64 value (what torch's int64 tensors hold)."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x
