// hf_dropgrad fused CPU masking kernel. The stream is defined in hf_dropgrad/functional.py; the
// loader and the Python entry points are in hf_dropgrad/kernels/cpp.py.
//
// Every entry point takes the global element offset `off` of the tensor's first element: the
// tensor holds elements [off, off + n) of the stream, so a contiguous slice of a parameter (a
// shard) masked with its offset gets exactly the decisions of those elements of the full
// parameter. The chunks a tensor touches are the global chunks off / 4096 .. (off + n - 1) / 4096;
// only the first and the last can be partial.
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
#define HFDG_LAMBDA_INLINE __attribute__((always_inline))

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
  int64_t offset;  // global index of data[0] in the stream
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

// Where a tensor of n elements at global offset `off` meets global chunk `c`: the valid in-chunk
// positions are [lo, hi), and in-chunk position r is data element c * kChunk + r - off.
struct Span {
  int64_t c, lo, hi;
};

HFDG_INLINE int64_t first_chunk(int64_t off) { return off / kChunk; }

HFDG_INLINE int64_t num_chunks(int64_t off, int64_t n) {
  return n <= 0 ? 0 : (off + n - 1) / kChunk - off / kChunk + 1;
}

HFDG_INLINE Span span_of(int64_t off, int64_t n, int64_t k) {
  const int64_t c = first_chunk(off) + k;
  const int64_t gs = c * kChunk;
  return Span{c, std::max(off, gs) - gs, std::min(off + n, gs + kChunk) - gs};
}

HFDG_INLINE uint64_t chunk_base(uint64_t key, int64_t c) {
  return key + (static_cast<uint64_t>(c) * kW + 1) * kGolden;
}

template <int DT, bool kAvx2>
HFDG_INLINE void apply_dt(void* g, const uint32_t* __restrict w, int shift, int64_t n, uint32_t t,
                          float scale) {
  if (DT == kF32) {
    apply_f32(static_cast<float*>(g), w, shift, n, t, scale);
  } else if (DT == kBF16) {
    apply_bf16(static_cast<uint16_t*>(g), w, shift, n, t, scale);
  } else {
#ifdef HFDG_X86
    if (kAvx2) {
      apply_f16_avx2(static_cast<uint16_t*>(g), w, shift, n, t, scale);
      return;
    }
#endif
    apply_f16_portable(static_cast<uint16_t*>(g), w, shift, n, t, scale);
  }
}

// One block of kSub counters of a full chunk whose first element is `chunk`: kSub hashes, then
// kSub elements in each of the 4 lanes. Working in blocks (rather than all 1024 hashes, then
// 4 x 1024 elements) interleaves the hash arithmetic with the memory stream, and the same block of
// the next chunk is prefetched meanwhile: on one Zen 3 core, fp32, 29-31 ms per 60.5M elements
// against 50-57 ms with whole-chunk phases (blocks of 32-128 with prefetch measure alike; 256 and
// up lose).
template <int DT, bool kAvx2>
HFDG_INLINE void mask_block(const Seg& s, uint64_t base, void* chunk, int64_t b0,
                            uint32_t* __restrict lo, uint32_t* __restrict hi) {
  using T = typename std::conditional<DT == kF32, float, uint16_t>::type;
  T* data = static_cast<T*>(chunk);
  constexpr int64_t kLine = 64 / sizeof(T);
  // Integer arithmetic: the last chunk's prefetch address lies past the tensor (a prefetch never
  // faults, but a pointer formed past the end would be undefined behaviour).
  const uintptr_t next = reinterpret_cast<uintptr_t>(data + b0) + kChunk * sizeof(T);
  for (int j = 0; j < 4; ++j) {
    for (int64_t k = 0; k < kSub; k += kLine) {
      __builtin_prefetch(reinterpret_cast<const void*>(next + (j * kW + k) * sizeof(T)), 1, 3);
    }
  }
  hash_block(base, b0, kSub, lo, hi);
  for (int j = 0; j < 4; ++j) {
    apply_dt<DT, kAvx2>(data + j * kW + b0, j < 2 ? lo : hi, (j & 1) * 16, kSub, s.threshold,
                        s.scale);
  }
}

// The valid positions [sp.lo, sp.hi) of a partial chunk (the first or last of a tensor), block by
// block; blocks with no valid position in any lane are not hashed.
template <typename Fn>
HFDG_INLINE void for_partial_chunk(uint64_t base, const Span& sp, uint32_t* __restrict lo,
                                   uint32_t* __restrict hi, Fn&& fn) {
  for (int64_t b0 = 0; b0 < kW; b0 += kSub) {
    bool any = false;
    for (int j = 0; j < 4 && !any; ++j) {
      any = std::max(j * kW + b0, sp.lo) < std::min(j * kW + b0 + kSub, sp.hi);
    }
    if (!any) continue;
    hash_block(base, b0, kSub, lo, hi);
    for (int j = 0; j < 4; ++j) {
      const int64_t a = std::max(j * kW + b0, sp.lo);
      const int64_t z = std::min(j * kW + b0 + kSub, sp.hi);
      if (a >= z) continue;
      // fn(first in-chunk position, words of that position, lane shift, count)
      fn(a, (j < 2 ? lo : hi) + (a - j * kW - b0), (j & 1) * 16, z - a);
    }
  }
}

// Masks chunks [k0, k1) (counted from the tensor's first chunk) of one tensor.
template <int DT, bool kAvx2>
HFDG_INLINE void mask_chunks_t(const Seg& s, int64_t k0, int64_t k1) {
  using T = typename std::conditional<DT == kF32, float, uint16_t>::type;
  alignas(64) uint32_t lo[kSub];
  alignas(64) uint32_t hi[kSub];
  T* data = static_cast<T*>(s.data);
  for (int64_t k = k0; k < k1; ++k) {
    const Span sp = span_of(s.offset, s.numel, k);
    const uint64_t base = chunk_base(s.key, sp.c);
    const int64_t gs = sp.c * kChunk - s.offset;  // data index of in-chunk position 0
    if (sp.lo == 0 && sp.hi == kChunk) {  // constant trip counts: no loop epilogues
      for (int64_t b0 = 0; b0 < kW; b0 += kSub) {
        mask_block<DT, kAvx2>(s, base, data + gs, b0, lo, hi);
      }
    } else {
      for_partial_chunk(base, sp, lo, hi,
                        [&](int64_t a, const uint32_t* w, int shift, int64_t cnt) HFDG_LAMBDA_INLINE {
                          apply_dt<DT, kAvx2>(data + gs + a, w, shift, cnt, s.threshold, s.scale);
                        });
    }
  }
}

template <bool kAvx2>
HFDG_INLINE void mask_chunks(const Seg& s, int64_t k0, int64_t k1) {
  switch (s.dtype) {
    case kF32:
      mask_chunks_t<kF32, kAvx2>(s, k0, k1);
      break;
    case kBF16:
      mask_chunks_t<kBF16, kAvx2>(s, k0, k1);
      break;
    default:
      mask_chunks_t<kF16, kAvx2>(s, k0, k1);
  }
}

// Keep decisions of the valid positions of chunk `sp` into dst[0, sp.hi - sp.lo).
HFDG_INLINE void keep_chunk(uint8_t* __restrict dst, uint64_t key, uint32_t t, const Span& sp,
                            uint32_t* __restrict lo, uint32_t* __restrict hi) {
  for_partial_chunk(chunk_base(key, sp.c), sp, lo, hi,
                    [&](int64_t a, const uint32_t* w, int shift, int64_t cnt) HFDG_LAMBDA_INLINE {
                      apply_keep(dst + (a - sp.lo), w, shift, cnt, t);
                    });
}

template <bool kAvx2>
HFDG_INLINE void keep_chunks(uint8_t* out, int64_t off, int64_t n, uint64_t key, uint32_t t,
                             int64_t k0, int64_t k1) {
  alignas(64) uint32_t lo[kSub];
  alignas(64) uint32_t hi[kSub];
  for (int64_t k = k0; k < k1; ++k) {
    const Span sp = span_of(off, n, k);
    keep_chunk(out + (sp.c * kChunk + sp.lo - off), key, t, sp, lo, hi);
  }
}

// Full update drop: the values of the *dropped* elements of a tensor, packed in stream order.
// counts[k] = dropped elements of the tensor's chunk k; offsets (their exclusive prefix sums) say
// where each chunk's values start, so chunks are gathered and scattered in parallel. Within a
// chunk the copy is branchless through a chunk-sized stack buffer (random keep decisions would
// defeat the branch predictor; writing straight into `values` would run past the chunk's slots).
template <bool kAvx2>
HFDG_INLINE void count_chunks(int64_t off, int64_t n, uint64_t key, uint32_t t, int64_t k0,
                              int64_t k1, int64_t* counts) {
  alignas(64) uint32_t lo[kSub];
  alignas(64) uint32_t hi[kSub];
  alignas(64) uint8_t keep[kChunk];
  for (int64_t k = k0; k < k1; ++k) {
    const Span sp = span_of(off, n, k);
    keep_chunk(keep, key, t, sp, lo, hi);
    const int64_t len = sp.hi - sp.lo;
    int64_t kept = 0;
    for (int64_t i = 0; i < len; ++i) kept += keep[i];
    counts[k] = len - kept;
  }
}

template <typename T, bool kGather, bool kAvx2>
HFDG_INLINE void move_chunks(T* __restrict data, T* __restrict values, int64_t off, int64_t n,
                             uint64_t key, uint32_t t, const int64_t* offsets, int64_t k0,
                             int64_t k1) {
  alignas(64) uint32_t lo[kSub];
  alignas(64) uint32_t hi[kSub];
  alignas(64) uint8_t keep[kChunk];
  alignas(64) T packed[kChunk + 1];
  for (int64_t k = k0; k < k1; ++k) {
    const Span sp = span_of(off, n, k);
    keep_chunk(keep, key, t, sp, lo, hi);
    const int64_t len = sp.hi - sp.lo;
    T* chunk = data + (sp.c * kChunk + sp.lo - off);
    T* slots = values + offsets[k];
    if (kGather) {
      int64_t m = 0;
      for (int64_t i = 0; i < len; ++i) {
        packed[m] = chunk[i];
        m += 1 - keep[i];
      }
      std::memcpy(slots, packed, m * sizeof(T));
    } else {
      const int64_t count = offsets[k + 1] - offsets[k];
      std::memcpy(packed, slots, count * sizeof(T));
      packed[count] = T(0);  // read (and discarded) when the chunk's last elements are kept
      int64_t m = 0;
      for (int64_t i = 0; i < len; ++i) {
        const T drop = static_cast<T>(1 - keep[i]);
        const T select = static_cast<T>(T(0) - drop);  // all ones where dropped
        chunk[i] = static_cast<T>((chunk[i] & static_cast<T>(~select)) | (packed[m] & select));
        m += drop;
      }
    }
  }
}

template <bool kGather, bool kAvx2>
HFDG_INLINE void move_chunks_any(void* data, void* values, int32_t esize, int64_t off, int64_t n,
                                 uint64_t key, uint32_t t, const int64_t* offsets, int64_t k0,
                                 int64_t k1) {
  switch (esize) {
    case 1:
      move_chunks<uint8_t, kGather, kAvx2>(static_cast<uint8_t*>(data),
                                           static_cast<uint8_t*>(values), off, n, key, t,
                                           offsets, k0, k1);
      break;
    case 2:
      move_chunks<uint16_t, kGather, kAvx2>(static_cast<uint16_t*>(data),
                                            static_cast<uint16_t*>(values), off, n, key, t,
                                            offsets, k0, k1);
      break;
    case 4:
      move_chunks<uint32_t, kGather, kAvx2>(static_cast<uint32_t*>(data),
                                            static_cast<uint32_t*>(values), off, n, key, t,
                                            offsets, k0, k1);
      break;
    default:
      move_chunks<uint64_t, kGather, kAvx2>(static_cast<uint64_t*>(data),
                                            static_cast<uint64_t*>(values), off, n, key, t,
                                            offsets, k0, k1);
  }
}

void mask_chunks_base(const Seg& s, int64_t k0, int64_t k1) { mask_chunks<false>(s, k0, k1); }
void keep_chunks_base(uint8_t* out, int64_t off, int64_t n, uint64_t key, uint32_t t, int64_t k0,
                      int64_t k1) {
  keep_chunks<false>(out, off, n, key, t, k0, k1);
}
void count_chunks_base(int64_t off, int64_t n, uint64_t key, uint32_t t, int64_t k0, int64_t k1,
                       int64_t* counts) {
  count_chunks<false>(off, n, key, t, k0, k1, counts);
}
template <bool kGather>
void move_chunks_base(void* data, void* values, int32_t esize, int64_t off, int64_t n,
                      uint64_t key, uint32_t t, const int64_t* offsets, int64_t k0, int64_t k1) {
  move_chunks_any<kGather, false>(data, values, esize, off, n, key, t, offsets, k0, k1);
}

#ifdef HFDG_X86
__attribute__((target("avx2,f16c"))) void mask_chunks_avx2(const Seg& s, int64_t k0, int64_t k1) {
  mask_chunks<true>(s, k0, k1);
}
__attribute__((target("avx2,f16c"))) void keep_chunks_avx2(uint8_t* out, int64_t off, int64_t n,
                                                           uint64_t key, uint32_t t, int64_t k0,
                                                           int64_t k1) {
  keep_chunks<true>(out, off, n, key, t, k0, k1);
}
__attribute__((target("avx2,f16c"))) void count_chunks_avx2(int64_t off, int64_t n, uint64_t key,
                                                            uint32_t t, int64_t k0, int64_t k1,
                                                            int64_t* counts) {
  count_chunks<true>(off, n, key, t, k0, k1, counts);
}
template <bool kGather>
__attribute__((target("avx2,f16c"))) void move_chunks_avx2(void* data, void* values, int32_t esize,
                                                           int64_t off, int64_t n, uint64_t key,
                                                           uint32_t t, const int64_t* offsets,
                                                           int64_t k0, int64_t k1) {
  move_chunks_any<kGather, true>(data, values, esize, off, n, key, t, offsets, k0, k1);
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
int g_isa = cpu_has_avx2() ? 1 : 0;
#else
int g_isa = 0;
#endif

HFDG_INLINE int64_t grain_of(int64_t off, int64_t n) {
  return n < kMinParallelElements ? std::max<int64_t>(1, num_chunks(off, n)) : kGrainChunks;
}

template <bool kGather>
void move_dropped(void* data, void* values, int32_t esize, int64_t off, int64_t n, uint64_t key,
                  uint32_t t, const int64_t* offsets) {
  const int isa = g_isa;
  at::parallel_for(0, num_chunks(off, n), grain_of(off, n), [&](int64_t k0, int64_t k1) {
#ifdef HFDG_X86
    if (isa) {
      move_chunks_avx2<kGather>(data, values, esize, off, n, key, t, offsets, k0, k1);
      return;
    }
#endif
    move_chunks_base<kGather>(data, values, esize, off, n, key, t, offsets, k0, k1);
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
void hfdg_mask(int64_t n, void* const* data, const int64_t* numels, const int64_t* offsets,
               const int32_t* dtypes, const uint64_t* keys, const uint32_t* thresholds,
               const float* scales) {
  std::vector<Seg> segs;
  std::vector<int64_t> first;  // first task chunk of each segment, plus the total at the end
  segs.reserve(n);
  first.reserve(n + 1);
  int64_t total = 0;
  int64_t elements = 0;
  for (int64_t i = 0; i < n; ++i) {
    // threshold 0 with scale 1 keeps everything unchanged: skip the pass.
    if (numels[i] <= 0 || (thresholds[i] == 0 && scales[i] == 1.0f)) continue;
    segs.push_back(
        Seg{data[i], numels[i], offsets[i], keys[i], thresholds[i], scales[i], dtypes[i]});
    first.push_back(total);
    total += num_chunks(offsets[i], numels[i]);
    elements += numels[i];
  }
  first.push_back(total);
  const int isa = g_isa;
  // Chunks of a segment are contiguous in [0, total): a task walks the segments it overlaps.
  const int64_t grain = elements < kMinParallelElements ? std::max<int64_t>(1, total) : kGrainChunks;
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    int64_t i = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, first[i + 1]);
      const int64_t k0 = begin - first[i], k1 = stop - first[i];
#ifdef HFDG_X86
      if (isa) {
        mask_chunks_avx2(segs[i], k0, k1);
      } else {
        mask_chunks_base(segs[i], k0, k1);
      }
#else
      mask_chunks_base(segs[i], k0, k1);
#endif
      begin = stop;
      ++i;
    }
  });
}

// out[e] = keep decision of stream element off + e (1 keep, 0 drop), e in [0, n).
void hfdg_keep_mask(uint8_t* out, int64_t n, int64_t off, uint64_t key, uint32_t threshold) {
  const int isa = g_isa;
  at::parallel_for(0, num_chunks(off, n), grain_of(off, n), [&](int64_t k0, int64_t k1) {
#ifdef HFDG_X86
    if (isa) {
      keep_chunks_avx2(out, off, n, key, threshold, k0, k1);
      return;
    }
#endif
    keep_chunks_base(out, off, n, key, threshold, k0, k1);
  });
}

// offsets[0, chunks] = exclusive prefix sums of the dropped elements per chunk (offsets[chunks]
// is their total, which is returned); chunks = num_chunks(off, n).
int64_t hfdg_count_dropped(int64_t n, int64_t off, uint64_t key, uint32_t threshold,
                           int64_t* offsets) {
  const int64_t chunks = num_chunks(off, n);
  const int isa = g_isa;
  at::parallel_for(0, chunks, grain_of(off, n), [&](int64_t k0, int64_t k1) {
#ifdef HFDG_X86
    if (isa) {
      count_chunks_avx2(off, n, key, threshold, k0, k1, offsets + 1);
      return;
    }
#endif
    count_chunks_base(off, n, key, threshold, k0, k1, offsets + 1);
  });
  offsets[0] = 0;
  for (int64_t k = 0; k < chunks; ++k) offsets[k + 1] += offsets[k];
  return offsets[chunks];
}

// values[offsets[k]...] = the dropped elements of chunk k of data (esize bytes each), in order.
void hfdg_gather_dropped(const void* data, int64_t n, int64_t off, int32_t esize, uint64_t key,
                         uint32_t threshold, const int64_t* offsets, void* values) {
  move_dropped<true>(const_cast<void*>(data), values, esize, off, n, key, threshold, offsets);
}

// The inverse: the dropped elements of data are overwritten with values; kept ones are untouched.
void hfdg_scatter_dropped(void* data, int64_t n, int64_t off, int32_t esize, uint64_t key,
                          uint32_t threshold, const int64_t* offsets, const void* values) {
  move_dropped<false>(data, const_cast<void*>(values), esize, off, n, key, threshold, offsets);
}

}  // extern "C"
