"""Fused CPU masking kernel: random bits, compare and scale in one vectorised pass.

The stream (see :mod:`hf_dropgrad.functional`, whose pure-torch reference this kernel matches bit
for bit): element ``e`` of a contiguous tensor, chunk ``c = e // 4096``, ``r = e % 4096``, lane
``j = r // 1024``, ``b = r % 1024``, reads the 16 bits ``(h >> 16 * j) & 0xFFFF`` of
``h = mix64(key + (c * 1024 + b + 1) * GOLDEN)`` (SplitMix64). It is kept when those bits are
``>= threshold`` and becomes ``round_to_dtype(float(g) * (scale if kept else 0.0f))``, so a dropped
inf/NaN still yields NaN. A chunk is processed in blocks of 64 counters: 64 hashes into a small
stack array (512 bytes per thread), then four vectorised loops over the lanes ``j`` doing
load/compare/select/multiply/store, while the next chunk's block is prefetched. No full-size
temporaries: one read and one write of every gradient.

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

import torch

__all__ = [
    "gather_dropped", "isa", "keep_mask", "load", "mask_", "packable", "scatter_dropped"
]

_RESOLUTION = 1 << 16
_CHUNK = 4096  # elements per chunk, kChunk in the C++ source
_MASK64 = (1 << 64) - 1
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DISABLE_ENV = "HF_DROPGRAD_DISABLE_EXTENSION"
_STALE_LOCK_S = 600.0

_SOURCE = r"""
// hf_dropgrad fused CPU masking kernel (see hf_dropgrad/_cpu_kernel.py for the stream definition).
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HFDG_X86 1
#endif

#define HFDG_INLINE inline __attribute__((always_inline))

namespace {

constexpr int64_t kChunk = 4096;  // elements per chunk
constexpr int64_t kW = 1024;      // 64-bit hashes per chunk (4 x 16 bits each)
constexpr int64_t kSub = 64;      // hashes per block (see mask_block)
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
// Threads only pay off above ~64K elements (tens of microseconds of work; waking a thread costs
// microseconds, far more on a loaded machine): calls with fewer elements in all run serially, and
// each task gets at least 8 chunks.
constexpr int64_t kGrainChunks = 8;
constexpr int64_t kMinParallelElements = 65536;

enum DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct Seg {
  void* data;
  int64_t numel;
  uint64_t key;
  uint32_t threshold;
  float scale;
  int32_t dtype;
};

HFDG_INLINE float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

HFDG_INLINE uint32_t bits_from_f32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// SplitMix64 outputs of counters (base counter) + b0 + b, b in [0, nb), where `base` already holds
// key + (first counter of the chunk + 1) * GOLDEN; split into low/high 32-bit halves so the
// per-element loops below work on 32-bit lanes only.
HFDG_INLINE void hash_block(uint64_t base, int64_t b0, int64_t nb, uint32_t* __restrict lo,
                            uint32_t* __restrict hi) {
  for (int64_t b = 0; b < nb; ++b) {
    uint64_t z = base + static_cast<uint64_t>(b0 + b) * kGolden;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    lo[b] = static_cast<uint32_t>(z);
    hi[b] = static_cast<uint32_t>(z >> 32);
  }
}

HFDG_INLINE float factor_of(uint32_t word, int shift, uint32_t t, float scale) {
  return ((word >> shift) & 0xFFFFu) >= t ? scale : 0.0f;
}

HFDG_INLINE void apply_f32(float* __restrict g, const uint32_t* __restrict w, int shift,
                           int64_t n, uint32_t t, float scale) {
  for (int64_t b = 0; b < n; ++b) {
    g[b] = g[b] * factor_of(w[b], shift, t, scale);
  }
}

// c10::BFloat16(float): round to nearest even, NaN -> 0x7FC0.
HFDG_INLINE void apply_bf16(uint16_t* __restrict g, const uint32_t* __restrict w, int shift,
                            int64_t n, uint32_t t, float scale) {
  for (int64_t b = 0; b < n; ++b) {
    const float v = f32_from_bits(static_cast<uint32_t>(g[b]) << 16) *
                    factor_of(w[b], shift, t, scale);
    const uint32_t u = bits_from_f32(v);
    const uint32_t r = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
    g[b] = static_cast<uint16_t>(v != v ? 0x7FC0u : r);
  }
}

// Portable c10::Half(float) path (bit manipulation, NaN -> sign | 0x7E00).
HFDG_INLINE void apply_f16_portable(uint16_t* __restrict g, const uint32_t* __restrict w,
                                    int shift, int64_t n, uint32_t t, float scale) {
  for (int64_t b = 0; b < n; ++b) {
    const float v = c10::detail::fp16_ieee_to_fp32_value(g[b]) * factor_of(w[b], shift, t, scale);
    g[b] = c10::detail::fp16_ieee_from_fp32_value(v);
  }
}

HFDG_INLINE void apply_keep(uint8_t* __restrict out, const uint32_t* __restrict w, int shift,
                            int64_t n, uint32_t t) {
  for (int64_t b = 0; b < n; ++b) {
    out[b] = ((w[b] >> shift) & 0xFFFFu) >= t ? 1 : 0;
  }
}

#ifdef HFDG_X86
// F16C conversion, then NaN lanes replaced by sign | 0x7E00 so the result equals the portable path.
__attribute__((target("avx2,f16c"))) void apply_f16_avx2(uint16_t* __restrict g,
                                                         const uint32_t* __restrict w, int shift,
                                                         int64_t n, uint32_t t, float scale) {
  const __m256i vt = _mm256_set1_epi32(static_cast<int32_t>(t));
  const __m256i vmask = _mm256_set1_epi32(0xFFFF);
  const __m256i vone = _mm256_set1_epi32(1);
  const __m128i shift_v = _mm_cvtsi32_si128(shift);
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m128i qnan = _mm_set1_epi16(0x7E00);
  const __m128i sign_bit = _mm_set1_epi16(static_cast<int16_t>(0x8000));
  int64_t b = 0;
  for (; b + 8 <= n; b += 8) {
    const __m256i word = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b));
    const __m256i u = _mm256_and_si256(_mm256_srl_epi32(word, shift_v), vmask);
    // u >= t  <=>  u + 1 > t  (both < 2^17, so signed compare is exact)
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_add_epi32(u, vone), vt);
    const __m256 f = _mm256_and_ps(_mm256_castsi256_ps(keep), vscale);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g + b));
    const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), f);
    __m128i r = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i isnan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(isnan),
                                          _mm256_extracti128_si256(isnan, 1));
    const __m128i canon = _mm_or_si128(_mm_and_si128(r, sign_bit), qnan);
    r = _mm_blendv_epi8(r, canon, nan16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(g + b), r);
  }
  apply_f16_portable(g + b, w + b, shift, n - b, t, scale);
}
#endif

// One block of kSub counters of chunk `c`: kSub hashes, then kSub elements in each of the 4 lanes.
// Working in blocks (rather than all 1024 hashes, then 4 x 1024 elements) interleaves the hash
// arithmetic with the memory stream, and the same block of the next chunk is prefetched
// meanwhile: on one Zen 3 core, fp32, 29-31 ms per 60.5M elements against 50-57 ms with
// whole-chunk phases (blocks of 32-128 with prefetch measure alike; 256 and up lose). `len` is
// the number of valid elements of the chunk.
template <int DT, bool kAvx2>
HFDG_INLINE void mask_block(const Seg& s, uint64_t base, int64_t start, int64_t len, int64_t b0,
                            int64_t nb, uint32_t* __restrict lo, uint32_t* __restrict hi) {
  using T = typename std::conditional<DT == kF32, float, uint16_t>::type;
  T* data = static_cast<T*>(s.data) + start;
  constexpr int64_t kLine = 64 / sizeof(T);
  // Integer arithmetic: the last chunk's prefetch address lies past the tensor (a prefetch never
  // faults, but a pointer formed past the end would be undefined behaviour).
  const uintptr_t next = reinterpret_cast<uintptr_t>(data + b0) + kChunk * sizeof(T);
  for (int j = 0; j < 4; ++j) {
    for (int64_t k = 0; k < nb; k += kLine) {
      __builtin_prefetch(reinterpret_cast<const void*>(next + (j * kW + k) * sizeof(T)), 1, 3);
    }
  }
  hash_block(base, b0, nb, lo, hi);
  for (int j = 0; j < 4; ++j) {
    const int64_t cnt = std::min(nb, len - j * kW - b0);
    if (cnt <= 0) break;
    const uint32_t* w = j < 2 ? lo : hi;
    const int shift = (j & 1) * 16;
    T* g = data + j * kW + b0;
    if (DT == kF32) {
      apply_f32(reinterpret_cast<float*>(g), w, shift, cnt, s.threshold, s.scale);
    } else if (DT == kBF16) {
      apply_bf16(reinterpret_cast<uint16_t*>(g), w, shift, cnt, s.threshold, s.scale);
    } else {
#ifdef HFDG_X86
      if (kAvx2) {
        apply_f16_avx2(reinterpret_cast<uint16_t*>(g), w, shift, cnt, s.threshold, s.scale);
        continue;
      }
#endif
      apply_f16_portable(reinterpret_cast<uint16_t*>(g), w, shift, cnt, s.threshold, s.scale);
    }
  }
}

// Masks chunks [c0, c1) of one tensor.
template <int DT, bool kAvx2>
HFDG_INLINE void mask_chunks_t(const Seg& s, int64_t c0, int64_t c1) {
  alignas(64) uint32_t lo[kSub];
  alignas(64) uint32_t hi[kSub];
  for (int64_t c = c0; c < c1; ++c) {
    const uint64_t base = s.key + (static_cast<uint64_t>(c) * kW + 1) * kGolden;
    const int64_t start = c * kChunk;
    const int64_t len = std::min(kChunk, s.numel - start);
    if (len == kChunk) {  // constant trip counts: no loop epilogues
      for (int64_t b0 = 0; b0 < kW; b0 += kSub) {
        mask_block<DT, kAvx2>(s, base, start, kChunk, b0, kSub, lo, hi);
      }
    } else {
      const int64_t nb_total = std::min(kW, len);
      for (int64_t b0 = 0; b0 < nb_total; b0 += kSub) {
        mask_block<DT, kAvx2>(s, base, start, len, b0, std::min(kSub, nb_total - b0), lo, hi);
      }
    }
  }
}

template <bool kAvx2>
HFDG_INLINE void mask_chunks(const Seg& s, int64_t c0, int64_t c1) {
  switch (s.dtype) {
    case kF32:
      mask_chunks_t<kF32, kAvx2>(s, c0, c1);
      break;
    case kBF16:
      mask_chunks_t<kBF16, kAvx2>(s, c0, c1);
      break;
    default:
      mask_chunks_t<kF16, kAvx2>(s, c0, c1);
  }
}

// Keep decisions of chunk `c` (of a stream of n elements) into dst[0, len).
template <bool kAvx2>
HFDG_INLINE void keep_chunk(uint8_t* __restrict dst, int64_t n, uint64_t key, uint32_t t,
                            int64_t c, uint32_t* __restrict lo, uint32_t* __restrict hi) {
  const uint64_t base = key + (static_cast<uint64_t>(c) * kW + 1) * kGolden;
  const int64_t len = std::min(kChunk, n - c * kChunk);
  const int64_t nb_total = std::min(kW, len);
  for (int64_t b0 = 0; b0 < nb_total; b0 += kSub) {
    const int64_t nb = std::min(kSub, nb_total - b0);
    hash_block(base, b0, nb, lo, hi);
    for (int j = 0; j < 4; ++j) {
      const int64_t cnt = std::min(nb, len - j * kW - b0);
      if (cnt <= 0) break;
      apply_keep(dst + j * kW + b0, j < 2 ? lo : hi, (j & 1) * 16, cnt, t);
    }
  }
}

template <bool kAvx2>
HFDG_INLINE void keep_chunks(uint8_t* out, int64_t n, uint64_t key, uint32_t t, int64_t c0,
                             int64_t c1) {
  alignas(64) uint32_t lo[kSub];
  alignas(64) uint32_t hi[kSub];
  for (int64_t c = c0; c < c1; ++c) {
    keep_chunk<kAvx2>(out + c * kChunk, n, key, t, c, lo, hi);
  }
}

// Full update drop: the values of the *dropped* elements of a tensor, packed in stream order.
// counts[c] = dropped elements of chunk c; offsets (their exclusive prefix sums) say where each
// chunk's values start, so chunks are gathered and scattered in parallel. Within a chunk the
// copy is branchless through a chunk-sized stack buffer (random keep decisions would defeat the
// branch predictor; writing straight into `values` would run past the chunk's slots).
template <bool kAvx2>
HFDG_INLINE void count_chunks(int64_t n, uint64_t key, uint32_t t, int64_t c0, int64_t c1,
                              int64_t* counts) {
  alignas(64) uint32_t lo[kSub];
  alignas(64) uint32_t hi[kSub];
  alignas(64) uint8_t keep[kChunk];
  for (int64_t c = c0; c < c1; ++c) {
    keep_chunk<kAvx2>(keep, n, key, t, c, lo, hi);
    const int64_t len = std::min(kChunk, n - c * kChunk);
    int64_t kept = 0;
    for (int64_t i = 0; i < len; ++i) kept += keep[i];
    counts[c] = len - kept;
  }
}

template <typename T, bool kGather, bool kAvx2>
HFDG_INLINE void move_chunks(T* __restrict data, T* __restrict values, int64_t n, uint64_t key,
                             uint32_t t, const int64_t* offsets, int64_t c0, int64_t c1) {
  alignas(64) uint32_t lo[kSub];
  alignas(64) uint32_t hi[kSub];
  alignas(64) uint8_t keep[kChunk];
  alignas(64) T packed[kChunk + 1];
  for (int64_t c = c0; c < c1; ++c) {
    keep_chunk<kAvx2>(keep, n, key, t, c, lo, hi);
    const int64_t len = std::min(kChunk, n - c * kChunk);
    T* chunk = data + c * kChunk;
    T* slots = values + offsets[c];
    if (kGather) {
      int64_t k = 0;
      for (int64_t i = 0; i < len; ++i) {
        packed[k] = chunk[i];
        k += 1 - keep[i];
      }
      std::memcpy(slots, packed, k * sizeof(T));
    } else {
      const int64_t count = offsets[c + 1] - offsets[c];
      std::memcpy(packed, slots, count * sizeof(T));
      packed[count] = T(0);  // read (and discarded) when the chunk's last elements are kept
      int64_t k = 0;
      for (int64_t i = 0; i < len; ++i) {
        const T drop = static_cast<T>(1 - keep[i]);
        const T select = static_cast<T>(T(0) - drop);  // all ones where dropped
        chunk[i] = static_cast<T>((chunk[i] & static_cast<T>(~select)) | (packed[k] & select));
        k += drop;
      }
    }
  }
}

template <bool kGather, bool kAvx2>
HFDG_INLINE void move_chunks_any(void* data, void* values, int32_t esize, int64_t n, uint64_t key,
                                 uint32_t t, const int64_t* offsets, int64_t c0, int64_t c1) {
  switch (esize) {
    case 1:
      move_chunks<uint8_t, kGather, kAvx2>(static_cast<uint8_t*>(data),
                                           static_cast<uint8_t*>(values), n, key, t, offsets,
                                           c0, c1);
      break;
    case 2:
      move_chunks<uint16_t, kGather, kAvx2>(static_cast<uint16_t*>(data),
                                            static_cast<uint16_t*>(values), n, key, t, offsets,
                                            c0, c1);
      break;
    case 4:
      move_chunks<uint32_t, kGather, kAvx2>(static_cast<uint32_t*>(data),
                                            static_cast<uint32_t*>(values), n, key, t, offsets,
                                            c0, c1);
      break;
    default:
      move_chunks<uint64_t, kGather, kAvx2>(static_cast<uint64_t*>(data),
                                            static_cast<uint64_t*>(values), n, key, t, offsets,
                                            c0, c1);
  }
}

void mask_chunks_base(const Seg& s, int64_t c0, int64_t c1) { mask_chunks<false>(s, c0, c1); }
void keep_chunks_base(uint8_t* out, int64_t n, uint64_t key, uint32_t t, int64_t c0, int64_t c1) {
  keep_chunks<false>(out, n, key, t, c0, c1);
}
void count_chunks_base(int64_t n, uint64_t key, uint32_t t, int64_t c0, int64_t c1,
                       int64_t* counts) {
  count_chunks<false>(n, key, t, c0, c1, counts);
}
template <bool kGather>
void move_chunks_base(void* data, void* values, int32_t esize, int64_t n, uint64_t key, uint32_t t,
                      const int64_t* offsets, int64_t c0, int64_t c1) {
  move_chunks_any<kGather, false>(data, values, esize, n, key, t, offsets, c0, c1);
}

#ifdef HFDG_X86
__attribute__((target("avx2,f16c"))) void mask_chunks_avx2(const Seg& s, int64_t c0, int64_t c1) {
  mask_chunks<true>(s, c0, c1);
}
__attribute__((target("avx2,f16c"))) void keep_chunks_avx2(uint8_t* out, int64_t n, uint64_t key,
                                                           uint32_t t, int64_t c0, int64_t c1) {
  keep_chunks<true>(out, n, key, t, c0, c1);
}
__attribute__((target("avx2,f16c"))) void count_chunks_avx2(int64_t n, uint64_t key, uint32_t t,
                                                            int64_t c0, int64_t c1,
                                                            int64_t* counts) {
  count_chunks<true>(n, key, t, c0, c1, counts);
}
template <bool kGather>
__attribute__((target("avx2,f16c"))) void move_chunks_avx2(void* data, void* values, int32_t esize,
                                                           int64_t n, uint64_t key, uint32_t t,
                                                           const int64_t* offsets, int64_t c0,
                                                           int64_t c1) {
  move_chunks_any<kGather, true>(data, values, esize, n, key, t, offsets, c0, c1);
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
int g_isa = cpu_has_avx2() ? 1 : 0;
#else
int g_isa = 0;
#endif

HFDG_INLINE int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

HFDG_INLINE int64_t grain_of(int64_t n) {
  return n < kMinParallelElements ? num_chunks(n) : kGrainChunks;
}

template <bool kGather>
void move_dropped(void* data, void* values, int32_t esize, int64_t n, uint64_t key, uint32_t t,
                  const int64_t* offsets) {
  const int isa = g_isa;
  at::parallel_for(0, num_chunks(n), grain_of(n), [&](int64_t c0, int64_t c1) {
#ifdef HFDG_X86
    if (isa) {
      move_chunks_avx2<kGather>(data, values, esize, n, key, t, offsets, c0, c1);
      return;
    }
#endif
    move_chunks_base<kGather>(data, values, esize, n, key, t, offsets, c0, c1);
  });
}

}  // namespace

extern "C" {

// 1 when the AVX2 path is in use, 0 for the portable one.
int hfdg_isa() { return g_isa; }

// Selects the code path (tests use 0 to check the portable path); returns the path in use.
int hfdg_set_isa(int isa) {
#ifdef HFDG_X86
  g_isa = (isa != 0 && cpu_has_avx2()) ? 1 : 0;
#else
  (void)isa;
#endif
  return g_isa;
}

// Masks n tensors in place; one parallel region over all chunks of all tensors.
void hfdg_mask(int64_t n, void* const* data, const int64_t* numels, const int32_t* dtypes,
               const uint64_t* keys, const uint32_t* thresholds, const float* scales) {
  std::vector<Seg> segs;
  std::vector<int64_t> first;  // first global chunk of each segment, plus the total at the end
  segs.reserve(n);
  first.reserve(n + 1);
  int64_t total = 0;
  int64_t elements = 0;
  for (int64_t i = 0; i < n; ++i) {
    // threshold 0 with scale 1 keeps everything unchanged: skip the pass.
    if (numels[i] <= 0 || (thresholds[i] == 0 && scales[i] == 1.0f)) continue;
    segs.push_back(Seg{data[i], numels[i], keys[i], thresholds[i], scales[i], dtypes[i]});
    first.push_back(total);
    total += num_chunks(numels[i]);
    elements += numels[i];
  }
  first.push_back(total);
  const int isa = g_isa;
  // Chunks of a segment are contiguous in [0, total): a task walks the segments it overlaps.
  const int64_t grain = elements < kMinParallelElements ? total : kGrainChunks;
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    int64_t i = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, first[i + 1]);
      const int64_t c0 = begin - first[i], c1 = stop - first[i];
#ifdef HFDG_X86
      if (isa) {
        mask_chunks_avx2(segs[i], c0, c1);
      } else {
        mask_chunks_base(segs[i], c0, c1);
      }
#else
      mask_chunks_base(segs[i], c0, c1);
#endif
      begin = stop;
      ++i;
    }
  });
}

// out[e] = keep decision of element e (1 keep, 0 drop).
void hfdg_keep_mask(uint8_t* out, int64_t n, uint64_t key, uint32_t threshold) {
  const int isa = g_isa;
  const int64_t grain = n < kMinParallelElements ? num_chunks(n) : kGrainChunks;
  at::parallel_for(0, num_chunks(n), grain, [&](int64_t c0, int64_t c1) {
#ifdef HFDG_X86
    if (isa) {
      keep_chunks_avx2(out, n, key, threshold, c0, c1);
      return;
    }
#endif
    keep_chunks_base(out, n, key, threshold, c0, c1);
  });
}

// offsets[0, chunks] = exclusive prefix sums of the dropped elements per chunk (offsets[chunks]
// is their total, which is returned); chunks = ceil(n / 4096).
int64_t hfdg_count_dropped(int64_t n, uint64_t key, uint32_t threshold, int64_t* offsets) {
  const int64_t chunks = num_chunks(n);
  const int isa = g_isa;
  at::parallel_for(0, chunks, grain_of(n), [&](int64_t c0, int64_t c1) {
#ifdef HFDG_X86
    if (isa) {
      count_chunks_avx2(n, key, threshold, c0, c1, offsets + 1);
      return;
    }
#endif
    count_chunks_base(n, key, threshold, c0, c1, offsets + 1);
  });
  offsets[0] = 0;
  for (int64_t c = 0; c < chunks; ++c) offsets[c + 1] += offsets[c];
  return offsets[chunks];
}

// values[offsets[c]...] = the dropped elements of chunk c of data (esize bytes each), in order.
void hfdg_gather_dropped(const void* data, int64_t n, int32_t esize, uint64_t key,
                         uint32_t threshold, const int64_t* offsets, void* values) {
  move_dropped<true>(const_cast<void*>(data), values, esize, n, key, threshold, offsets);
}

// The inverse: the dropped elements of data are overwritten with values; kept ones are untouched.
void hfdg_scatter_dropped(void* data, int64_t n, int32_t esize, uint64_t key, uint32_t threshold,
                          const int64_t* offsets, const void* values) {
  move_dropped<false>(data, const_cast<void*>(values), esize, n, key, threshold, offsets);
}

}  // extern "C"
"""

_CFLAGS = ["-O3", "-fopenmp"] if sys.platform.startswith("linux") else ["-O3"]
_LDFLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _extension_name() -> str:
    digest = hashlib.sha256(
        "\0".join([_SOURCE, *_CFLAGS, *_LDFLAGS, torch.__version__]).encode()
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
        cpp_sources=[_SOURCE],
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        is_python_module=False,
        no_implicit_headers=True,
        verbose=False,
    )
    lib = ctypes.CDLL(path)
    i64, u64, u32, ptr = ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p
    lib.hfdg_mask.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.hfdg_mask.restype = None
    lib.hfdg_keep_mask.argtypes = [ptr, i64, u64, u32]
    lib.hfdg_keep_mask.restype = None
    lib.hfdg_count_dropped.argtypes = [i64, u64, u32, ptr]
    lib.hfdg_count_dropped.restype = i64
    lib.hfdg_gather_dropped.argtypes = [ptr, i64, ctypes.c_int32, u64, u32, ptr, ptr]
    lib.hfdg_gather_dropped.restype = None
    lib.hfdg_scatter_dropped.argtypes = [ptr, i64, ctypes.c_int32, u64, u32, ptr, ptr]
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
    """
    lib = _require()
    n = len(grads)
    if not len(keys) == len(thresholds) == len(scales) == n:
        raise ValueError(
            f"grads, keys, thresholds and scales differ in length: "
            f"{n}, {len(keys)}, {len(thresholds)}, {len(scales)}"
        )
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
    keys_arr = array("Q", [int(k) & _MASK64 for k in keys])
    thr_arr = array("I", thr)
    scale_arr = array("f", [float(s) for s in scales])  # C double -> float rounding
    lib.hfdg_mask(
        n,
        ptrs.buffer_info()[0],
        numels.buffer_info()[0],
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
    numel: int, key: int, threshold: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The stream's keep decisions (``True`` = kept) of ``numel`` elements, a bool CPU tensor.

    ``out`` (a contiguous bool CPU tensor of ``numel`` elements, any shape) is filled and returned
    instead of a new tensor: reusing one saves the page faults of a fresh allocation, which cost
    more than the kernel itself (60.5M elements, one thread: 40 ms into a reused buffer, ~95 ms
    into a new one).
    """
    lib = _require()
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    t = _check_threshold(threshold)
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
        lib.hfdg_keep_mask(out.data_ptr(), numel, int(key) & _MASK64, t)
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


def _num_chunks(numel: int) -> int:
    return -(-numel // _CHUNK)


def gather_dropped(
    tensor: torch.Tensor, key: int, threshold: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The elements of ``tensor`` the stream drops, packed in order, with their chunk offsets.

    Returns ``(values, offsets)``: ``values`` is a 1-D tensor of ``tensor.dtype`` equal to
    ``tensor.flatten()[~keep_mask(...)]``; ``offsets`` (int64, one per 4096-element chunk plus
    one) locate each chunk's values and are what :func:`scatter_dropped` needs to put them back.
    Made without a full-size mask: the keep decisions are regenerated chunk by chunk.
    """
    lib = _require()
    _check_packable(tensor)
    t = _check_threshold(threshold)
    n = tensor.numel()
    key = int(key) & _MASK64
    offsets = torch.empty(_num_chunks(n) + 1, dtype=torch.int64)
    total = lib.hfdg_count_dropped(n, key, t, offsets.data_ptr())
    values = torch.empty(total, dtype=tensor.dtype)
    if total:
        lib.hfdg_gather_dropped(
            tensor.data_ptr(), n, tensor.element_size(), key, t, offsets.data_ptr(),
            values.data_ptr(),
        )
    return values, offsets


def scatter_dropped(
    tensor: torch.Tensor, key: int, threshold: int, values: torch.Tensor, offsets: torch.Tensor
) -> None:
    """Write ``values`` back into the dropped elements of ``tensor`` (see :func:`gather_dropped`).

    Kept elements are not touched. ``values`` and ``offsets`` must come from
    :func:`gather_dropped` with the same ``key``, ``threshold`` and number of elements.
    """
    lib = _require()
    _check_packable(tensor)
    t = _check_threshold(threshold)
    n = tensor.numel()
    chunks = _num_chunks(n)
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
            tensor.data_ptr(), n, tensor.element_size(), int(key) & _MASK64, t,
            offsets.data_ptr(), values.data_ptr(),
        )
