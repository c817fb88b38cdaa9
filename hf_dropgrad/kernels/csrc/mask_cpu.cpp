// hf_dropgrad fused CPU kernels: the CPU implementation of the hf_dropgrad:: torch ops. The stream
// is defined in hf_dropgrad/kernels/stream.py; the op schemas in hf_dropgrad/kernels/ops.py (they
// exist with or without this library, whose TORCH_LIBRARY_IMPL block at the end adds the CPU
// kernels); the loader and the checked Python entry points in hf_dropgrad/kernels/cpp.py.
//
// Every op takes, per tensor, where its elements sit in the stream (hf_dropgrad/kernels/checks.py):
// the global element offset `off` of its first element, and its runs: a tensor of n elements in
// runs of `run` (stride `stride`) holds n / run runs, run r (elements [r * run, (r + 1) * run))
// being stream elements [off + r * stride, off + r * stride + run). One run (run == n) is a
// contiguous slice of the stream, so a contiguous shard of a parameter masked with its offset gets
// exactly the decisions of those elements of the full parameter; several runs are e.g. a column
// shard (tensor parallel). The ops expand each run into a segment of its own, so every kernel below
// sees contiguous runs: the chunks a run touches are the global chunks off / 4096 ..
// (off + run - 1) / 4096, only the first and the last partial. Chunks are numbered segment by
// segment (tensor by tensor, run by run), which is the numbering of full update drop's starts.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
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
  int64_t* counts;  // mask_counted_: dropped elements of the tensor's chunk k go to counts[k]
  const void* source;  // mask_gather_dropped_: the tensor whose dropped elements are packed
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

// The code paths, best last; the ISA-specific ones are compiled with a target attribute and chosen
// at run time (g_isa), so the library is built for the baseline ISA and runs on any x86-64 CPU.
enum Isa : int { kIsaPortable = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
#define HFDG_TARGET_AVX2 __attribute__((target("avx2,f16c")))
#define HFDG_TARGET_AVX512 __attribute__((target("avx2,f16c,avx512f,avx512dq,avx512bw,avx512vl")))

// SplitMix64 outputs of counters (base counter) + b0 + b, b in [0, nb), where `base` already holds
// key + (first counter of the chunk + 1) * GOLDEN; split into low/high 32-bit halves so the
// per-element loops below work on 32-bit lanes only.
HFDG_INLINE void hash_block_portable(uint64_t base, int64_t b0, int64_t nb,
                                     uint32_t* __restrict lo, uint32_t* __restrict hi) {
  for (int64_t b = 0; b < nb; ++b) {
    uint64_t z = base + static_cast<uint64_t>(b0 + b) * kGolden;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    lo[b] = static_cast<uint32_t>(z);
    hi[b] = static_cast<uint32_t>(z >> 32);
  }
}

#ifdef HFDG_X86
// The same hashes 8 at a time: AVX-512DQ multiplies 64-bit lanes (vpmullq), which AVX2 cannot, so
// this is where the AVX-512 path gains (the hash is about half of a masking pass's work on AVX2).
// nb is a multiple of 8 (always kSub).
HFDG_TARGET_AVX512 void hash_block_avx512(uint64_t base, int64_t b0, int64_t nb,
                                          uint32_t* __restrict lo, uint32_t* __restrict hi) {
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i golden = _mm512_set1_epi64(static_cast<int64_t>(kGolden));
  const __m512i m1 = _mm512_set1_epi64(static_cast<int64_t>(0xBF58476D1CE4E5B9ULL));
  const __m512i m2 = _mm512_set1_epi64(static_cast<int64_t>(0x94D049BB133111EBULL));
  for (int64_t b = 0; b < nb; b += 8) {
    const __m512i counter = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(b0 + b)), lane);
    __m512i z = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(base)),
                                 _mm512_mullo_epi64(counter, golden));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), m1);
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), m2);
    z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + b), _mm512_cvtepi64_epi32(z));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + b),
                        _mm512_cvtepi64_epi32(_mm512_srli_epi64(z, 32)));
  }
}
#endif

template <int kIsa>
HFDG_INLINE void hash_block(uint64_t base, int64_t b0, int64_t nb, uint32_t* __restrict lo,
                            uint32_t* __restrict hi) {
#ifdef HFDG_X86
  if (kIsa >= kIsaAvx512) {
    hash_block_avx512(base, b0, nb, lo, hi);
    return;
  }
#endif
  hash_block_portable(base, b0, nb, lo, hi);
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

// Dropped positions among n words of one lane: (w[b] >> shift) & 0xFFFF below t. Vectorises to a
// shift, a compare and a subtract per 8 words.
HFDG_INLINE int64_t count_dropped(const uint32_t* __restrict w, int shift, int64_t n, uint32_t t) {
  uint32_t m = 0;
  for (int64_t b = 0; b < n; ++b) {
    m += ((w[b] >> shift) & 0xFFFFu) < t ? 1u : 0u;
  }
  return m;
}

#ifdef HFDG_X86
// F16C conversion, then NaN lanes replaced by sign | 0x7E00 so the result equals the portable path.
HFDG_TARGET_AVX2 void apply_f16_avx2(uint16_t* __restrict g,
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

// apply_bf16 eight at a time: the same float product and the same integer round-to-nearest-even,
// NaN lanes replaced by 0x7FC0, the 32-bit results packed back to 16 bits (exact: all <= 0xFFFF).
HFDG_TARGET_AVX2 void apply_bf16_avx2(uint16_t* __restrict g,
                                      const uint32_t* __restrict w, int shift,
                                      int64_t n, uint32_t t, float scale) {
  const __m256i vt = _mm256_set1_epi32(static_cast<int32_t>(t));
  const __m256i vmask = _mm256_set1_epi32(0xFFFF);
  const __m256i vone = _mm256_set1_epi32(1);
  const __m256i vround = _mm256_set1_epi32(0x7FFF);
  const __m256i vnan = _mm256_set1_epi32(0x7FC0);
  const __m128i shift_v = _mm_cvtsi32_si128(shift);
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t b = 0;
  for (; b + 8 <= n; b += 8) {
    const __m256i word = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b));
    const __m256i u = _mm256_and_si256(_mm256_srl_epi32(word, shift_v), vmask);
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_add_epi32(u, vone), vt);
    const __m256 f = _mm256_and_ps(_mm256_castsi256_ps(keep), vscale);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g + b));
    const __m256 x = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    const __m256 v = _mm256_mul_ps(x, f);
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), vone);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, lsb), vround), 16);
    const __m256i isnan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, vnan, isnan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(g + b), _mm256_castsi256_si128(packed));
  }
  apply_bf16(g + b, w + b, shift, n - b, t, scale);
}

// apply_bf16_avx2 sixteen at a time, the keep decisions in a mask register.
HFDG_TARGET_AVX512 void apply_bf16_avx512(uint16_t* __restrict g, const uint32_t* __restrict w,
                                          int shift, int64_t n, uint32_t t, float scale) {
  const __m512i vt = _mm512_set1_epi32(static_cast<int32_t>(t));
  const __m512i vmask = _mm512_set1_epi32(0xFFFF);
  const __m512i vone = _mm512_set1_epi32(1);
  const __m512i vround = _mm512_set1_epi32(0x7FFF);
  const __m512i vnan = _mm512_set1_epi32(0x7FC0);
  const __m128i shift_v = _mm_cvtsi32_si128(shift);
  const __m512 vscale = _mm512_set1_ps(scale);
  int64_t b = 0;
  for (; b + 16 <= n; b += 16) {
    const __m512i word = _mm512_loadu_si512(w + b);
    const __m512i u = _mm512_and_si512(_mm512_srl_epi32(word, shift_v), vmask);
    const __m512 f = _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(u, vt), vscale);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + b));
    const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    const __m512 v = _mm512_mul_ps(x, f);
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), vone);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, lsb), vround), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), vnan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(g + b), _mm512_cvtepi32_epi16(r));
  }
  apply_bf16(g + b, w + b, shift, n - b, t, scale);
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

template <int DT, int kIsa>
HFDG_INLINE void apply_dt(void* g, const uint32_t* __restrict w, int shift, int64_t n, uint32_t t,
                          float scale) {
  if (DT == kF32) {
    apply_f32(static_cast<float*>(g), w, shift, n, t, scale);
  } else if (DT == kBF16) {
#ifdef HFDG_X86
    if (kIsa >= kIsaAvx512) {
      apply_bf16_avx512(static_cast<uint16_t*>(g), w, shift, n, t, scale);
      return;
    }
    if (kIsa >= kIsaAvx2) {
      apply_bf16_avx2(static_cast<uint16_t*>(g), w, shift, n, t, scale);
      return;
    }
#endif
    apply_bf16(static_cast<uint16_t*>(g), w, shift, n, t, scale);
  } else {
#ifdef HFDG_X86
    if (kIsa >= kIsaAvx2) {
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
// Prefetches block b0's four runs (kSub elements of esize bytes at in-chunk positions
// j * kW + b0, j < 4) of the chunk whose position 0 is at address chunk0. Integer addresses: a
// chunk past a tensor's end (the next chunk of its last one) or a partial chunk's runs may lie
// outside the tensor; a prefetch never faults, but a pointer formed there would be undefined.
template <bool kWrite>
HFDG_INLINE void prefetch_block(uintptr_t chunk0, int64_t b0, int64_t esize) {
  for (int j = 0; j < 4; ++j) {
    const uintptr_t run = chunk0 + (j * kW + b0) * esize;
    for (int64_t line = 0; line < kSub * esize; line += 64) {
      __builtin_prefetch(reinterpret_cast<const void*>(run + line), kWrite ? 1 : 0, 3);
    }
  }
}

template <int DT, int kIsa, bool kCount>
HFDG_INLINE int64_t mask_block(const Seg& s, uint64_t base, void* chunk, int64_t b0,
                               uint32_t* __restrict lo, uint32_t* __restrict hi) {
  using T = typename std::conditional<DT == kF32, float, uint16_t>::type;
  T* data = static_cast<T*>(chunk);
  prefetch_block<true>(reinterpret_cast<uintptr_t>(data) + kChunk * sizeof(T), b0, sizeof(T));
  hash_block<kIsa>(base, b0, kSub, lo, hi);
  for (int j = 0; j < 4; ++j) {
    apply_dt<DT, kIsa>(data + j * kW + b0, j < 2 ? lo : hi, (j & 1) * 16, kSub, s.threshold,
                        s.scale);
  }
  int64_t dropped = 0;
  if (kCount) {
    for (int j = 0; j < 4; ++j) {
      dropped += count_dropped(j < 2 ? lo : hi, (j & 1) * 16, kSub, s.threshold);
    }
  }
  return dropped;
}

// mask_block for a chunk whose valid positions are whole lanes [j0, j1) (a run that covers
// lanes of a chunk, e.g. a tensor-parallel column shard's half rows): the same constant trip
// counts, only those lanes applied, and block b0 of the same lanes prefetched at next (the
// tensor memory that the next chunk's lanes take; a hint, never dereferenced).
template <int DT, int kIsa, bool kCount>
HFDG_INLINE int64_t mask_block_lanes(const Seg& s, uint64_t base, void* chunk, uintptr_t next,
                                     int64_t b0, int j0, int j1, uint32_t* __restrict lo,
                                     uint32_t* __restrict hi) {
  using T = typename std::conditional<DT == kF32, float, uint16_t>::type;
  T* data = static_cast<T*>(chunk);
  for (int j = j0; j < j1; ++j) {
    const uintptr_t run = next + (j * kW + b0) * sizeof(T);
    for (int64_t line = 0; line < kSub * static_cast<int64_t>(sizeof(T)); line += 64) {
      __builtin_prefetch(reinterpret_cast<const void*>(run + line), 1, 3);
    }
  }
  hash_block<kIsa>(base, b0, kSub, lo, hi);
  int64_t dropped = 0;
  for (int j = j0; j < j1; ++j) {
    apply_dt<DT, kIsa>(data + j * kW + b0, j < 2 ? lo : hi, (j & 1) * 16, kSub, s.threshold,
                        s.scale);
    if (kCount) dropped += count_dropped(j < 2 ? lo : hi, (j & 1) * 16, kSub, s.threshold);
  }
  return dropped;
}

// The valid positions [sp.lo, sp.hi) of a partial chunk (the first or last of a tensor), block by
// block; blocks with no valid position in any lane are not hashed.
template <int kIsa, typename Fn>
HFDG_INLINE void for_partial_chunk(uint64_t base, const Span& sp, uint32_t* __restrict lo,
                                   uint32_t* __restrict hi, Fn&& fn) {
  for (int64_t b0 = 0; b0 < kW; b0 += kSub) {
    bool any = false;
    for (int j = 0; j < 4 && !any; ++j) {
      any = std::max(j * kW + b0, sp.lo) < std::min(j * kW + b0 + kSub, sp.hi);
    }
    if (!any) continue;
    hash_block<kIsa>(base, b0, kSub, lo, hi);
    for (int j = 0; j < 4; ++j) {
      const int64_t a = std::max(j * kW + b0, sp.lo);
      const int64_t z = std::min(j * kW + b0 + kSub, sp.hi);
      if (a >= z) continue;
      // fn(first in-chunk position, words of that position, lane shift, count)
      fn(a, (j < 2 ? lo : hi) + (a - j * kW - b0), (j & 1) * 16, z - a);
    }
  }
}

// Masks chunks [k0, k1) (counted from the tensor's first chunk) of one tensor; with kCount also
// writes the dropped elements of chunk k to s.counts[k], from the hashes already made (the counts
// full update drop's packing needs, without a pass of its own).
template <int DT, int kIsa, bool kCount>
HFDG_INLINE void mask_chunks_t(const Seg& s, int64_t k0, int64_t k1) {
  using T = typename std::conditional<DT == kF32, float, uint16_t>::type;
  alignas(64) uint32_t lo[kSub];
  alignas(64) uint32_t hi[kSub];
  T* data = static_cast<T*>(s.data);
  for (int64_t k = k0; k < k1; ++k) {
    const Span sp = span_of(s.offset, s.numel, k);
    const uint64_t base = chunk_base(s.key, sp.c);
    const int64_t gs = sp.c * kChunk - s.offset;  // data index of in-chunk position 0
    int64_t dropped = 0;
    if (sp.lo == 0 && sp.hi == kChunk) {  // constant trip counts: no loop epilogues
      for (int64_t b0 = 0; b0 < kW; b0 += kSub) {
        dropped += mask_block<DT, kIsa, kCount>(s, base, data + gs, b0, lo, hi);
      }
    } else if (sp.lo % kW == 0 && sp.hi % kW == 0) {  // whole lanes: a run of a column shard
      // The next chunk's lanes: further on in this run, or, past its end, the next run's (the
      // next segment, whose data follows this one's in a row-major local tensor).
      const uintptr_t next = reinterpret_cast<uintptr_t>(data + gs) +
                             (k + 1 < k1 ? kChunk : sp.hi - sp.lo) * sizeof(T);
      const int j0 = static_cast<int>(sp.lo / kW), j1 = static_cast<int>(sp.hi / kW);
      for (int64_t b0 = 0; b0 < kW; b0 += kSub) {
        dropped += mask_block_lanes<DT, kIsa, kCount>(s, base, data + gs, next, b0, j0, j1, lo,
                                                      hi);
      }
    } else {
      for_partial_chunk<kIsa>(base, sp, lo, hi,
                        [&](int64_t a, const uint32_t* w, int shift, int64_t cnt) HFDG_LAMBDA_INLINE {
                          apply_dt<DT, kIsa>(data + gs + a, w, shift, cnt, s.threshold, s.scale);
                          if (kCount) dropped += count_dropped(w, shift, cnt, s.threshold);
                        });
    }
    if (kCount) s.counts[k] = dropped;
  }
}

// fn(std::integral_constant<int, DT>{}) for the gradient dtype code `dtype` (a Seg's).
template <typename Fn>
HFDG_INLINE void by_dtype(int32_t dtype, Fn&& fn) {
  switch (dtype) {
    case kF32:
      fn(std::integral_constant<int, kF32>{});
      break;
    case kBF16:
      fn(std::integral_constant<int, kBF16>{});
      break;
    default:
      fn(std::integral_constant<int, kF16>{});
  }
}

template <int kIsa, bool kCount>
HFDG_INLINE void mask_chunks(const Seg& s, int64_t k0, int64_t k1) {
  by_dtype(s.dtype, [&](auto dt) HFDG_LAMBDA_INLINE {
    mask_chunks_t<decltype(dt)::value, kIsa, kCount>(s, k0, k1);
  });
}

// Keep decisions of the valid positions of chunk `sp` into dst[0, sp.hi - sp.lo).
template <int kIsa>
HFDG_INLINE void keep_chunk(uint8_t* __restrict dst, uint64_t key, uint32_t t, const Span& sp,
                            uint32_t* __restrict lo, uint32_t* __restrict hi) {
  for_partial_chunk<kIsa>(chunk_base(key, sp.c), sp, lo, hi,
                    [&](int64_t a, const uint32_t* w, int shift, int64_t cnt) HFDG_LAMBDA_INLINE {
                      apply_keep(dst + (a - sp.lo), w, shift, cnt, t);
                    });
}

template <int kIsa>
HFDG_INLINE void keep_chunks(uint8_t* out, int64_t off, int64_t n, uint64_t key, uint32_t t,
                             int64_t k0, int64_t k1) {
  alignas(64) uint32_t lo[kSub];
  alignas(64) uint32_t hi[kSub];
  for (int64_t k = k0; k < k1; ++k) {
    const Span sp = span_of(off, n, k);
    keep_chunk<kIsa>(out + (sp.c * kChunk + sp.lo - off), key, t, sp, lo, hi);
  }
}


// Full update drop over a list of tensors. The chunks of all the tensors are numbered in list
// order (tensor 0's chunks first); starts[c] is the index in `values` of the first dropped element
// of chunk c, starts[total] the number of dropped elements. Saving is a count pass (hashes only: no
// tensor memory is read) turned into `starts` by a prefix sum, then a gather pass; restoring is
// the scatter pass. Each pass turns a chunk's hashes straight into 64 words of "dropped" bits
// (bit r % 64 of word r / 64 for in-chunk position r: a vector compare and a movemask per 8
// positions on AVX2); the count is their popcount, and a move walks the set bits (count trailing
// zeros), so the copying follows the dropped elements (p of the chunk), not every element, with
// about one mispredicted branch per 64 elements.
struct PackSeg {
  char* data;
  int64_t numel;
  int64_t offset;
  uint64_t key;
  uint32_t threshold;
};

constexpr int kWords = kChunk / 64;  // words of drop bits per chunk

// Bit b of the result: position b of the 64 is dropped (its 16 bits, (w[b] >> shift) & 0xFFFF,
// are below t).
HFDG_INLINE uint64_t drop_bits_portable(const uint32_t* __restrict w, int shift, uint32_t t) {
  uint64_t m = 0;
  for (int b = 0; b < 64; ++b) {
    m |= static_cast<uint64_t>(((w[b] >> shift) & 0xFFFFu) < t) << b;
  }
  return m;
}

#ifdef HFDG_X86
HFDG_TARGET_AVX2 inline uint64_t drop_bits_avx2(const uint32_t* __restrict w,
                                                int shift, uint32_t t) {
  const __m256i vt = _mm256_set1_epi32(static_cast<int32_t>(t));
  const __m256i vmask = _mm256_set1_epi32(0xFFFF);
  const __m128i shift_v = _mm_cvtsi32_si128(shift);
  uint64_t m = 0;
  for (int q = 0; q < 8; ++q) {
    const __m256i word = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8 * q));
    const __m256i u = _mm256_and_si256(_mm256_srl_epi32(word, shift_v), vmask);
    const __m256i dropped = _mm256_cmpgt_epi32(vt, u);  // u < t (both < 2^17: signed is exact)
    m |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_castsi256_ps(dropped))) << (8 * q);
  }
  return m;
}

// The same 64 bits from four 16-lane compares straight into mask registers.
HFDG_TARGET_AVX512 inline uint64_t drop_bits_avx512(const uint32_t* __restrict w, int shift,
                                                     uint32_t t) {
  const __m512i vt = _mm512_set1_epi32(static_cast<int32_t>(t));
  const __m512i vmask = _mm512_set1_epi32(0xFFFF);
  const __m128i shift_v = _mm_cvtsi32_si128(shift);
  uint64_t m = 0;
  for (int q = 0; q < 4; ++q) {
    const __m512i word = _mm512_loadu_si512(w + 16 * q);
    const __m512i u = _mm512_and_si512(_mm512_srl_epi32(word, shift_v), vmask);
    m |= static_cast<uint64_t>(_mm512_cmplt_epu32_mask(u, vt)) << (16 * q);
  }
  return m;
}
#endif

template <int kIsa>
HFDG_INLINE uint64_t drop_bits(const uint32_t* __restrict w, int shift, uint32_t t) {
#ifdef HFDG_X86
  if (kIsa >= kIsaAvx512) return drop_bits_avx512(w, shift, t);
  if (kIsa >= kIsaAvx2) return drop_bits_avx2(w, shift, t);
#endif
  return drop_bits_portable(w, shift, t);
}

// words[0, kWords) = drop bits of chunk sp.c, positions outside [sp.lo, sp.hi) cleared. Blocks of
// 64 counters with no valid position are not hashed.
// pf (0: none): address of the chunk's in-chunk position 0 in the tensor, of esize-byte elements;
// each block prefetches the tensor memory its words cover (4 runs of 64 elements), so the moves
// that follow find the chunk in cache (integer addresses: a partial chunk's runs may lie outside
// the tensor, and a prefetch never faults).
template <int kIsa, bool kWrite = false>
HFDG_INLINE void drop_words(uint64_t key, uint32_t t, const Span& sp, uint64_t* __restrict words,
                            uint32_t* __restrict lo, uint32_t* __restrict hi, uintptr_t pf = 0,
                            int64_t esize = 0) {
  const uint64_t base = chunk_base(key, sp.c);
  const bool full = sp.lo == 0 && sp.hi == kChunk;
  for (int64_t b0 = 0; b0 < kW; b0 += kSub) {
    if (!full) {
      bool any = false;
      for (int j = 0; j < 4 && !any; ++j) {
        any = std::max(j * kW + b0, sp.lo) < std::min(j * kW + b0 + kSub, sp.hi);
      }
      if (!any) {
        for (int j = 0; j < 4; ++j) words[(j * kW + b0) / 64] = 0;
        continue;
      }
    }
    if (pf != 0) prefetch_block<kWrite>(pf, b0, esize);
    hash_block<kIsa>(base, b0, kSub, lo, hi);
    for (int j = 0; j < 4; ++j) {
      const uint32_t* w = j < 2 ? lo : hi;
      const int shift = (j & 1) * 16;
      words[(j * kW + b0) / 64] = drop_bits<kIsa>(w, shift, t);
    }
  }
  if (!full) {  // clear the positions outside the tensor
    for (int q = 0; q < kWords; ++q) {
      const int64_t r0 = 64 * q;
      const int64_t a = std::max<int64_t>(sp.lo - r0, 0), z = std::min<int64_t>(sp.hi - r0, 64);
      if (a >= z) {
        words[q] = 0;
      } else {
        const uint64_t upper = z == 64 ? ~uint64_t{0} : ((uint64_t{1} << z) - 1);
        words[q] &= upper & ~((uint64_t{1} << a) - 1);
      }
    }
  }
}

template <int kIsa>
HFDG_INLINE void count_chunks(const PackSeg& s, int64_t k0, int64_t k1, int64_t* counts) {
  alignas(64) uint32_t lo[kSub];
  alignas(64) uint32_t hi[kSub];
  alignas(64) uint64_t words[kWords];
  for (int64_t k = k0; k < k1; ++k) {
    const Span sp = span_of(s.offset, s.numel, k);
    if (s.threshold == 0) {
      counts[k] = 0;
    } else if (s.threshold >= 65536) {
      counts[k] = sp.hi - sp.lo;
    } else {
      drop_words<kIsa>(s.key, s.threshold, sp, words, lo, hi);
      int64_t n = 0;
      for (int q = 0; q < kWords; ++q) n += __builtin_popcountll(words[q]);
      counts[k] = n;
    }
  }
}

// The elements of chunk[0, kChunk) whose bits are set in words, in position order, to packed[0,
// n); returns n. unpack_words is the inverse.
template <typename T>
HFDG_INLINE int64_t pack_words(const uint64_t* __restrict words, const T* __restrict chunk,
                               T* __restrict packed) {
  int64_t m = 0;
  for (int q = 0; q < kWords; ++q) {
    for (uint64_t d = words[q]; d; d &= d - 1) packed[m++] = chunk[64 * q + __builtin_ctzll(d)];
  }
  return m;
}

template <typename T>
HFDG_INLINE void unpack_words(const uint64_t* __restrict words, const T* __restrict packed,
                              T* __restrict chunk) {
  int64_t m = 0;
  for (int q = 0; q < kWords; ++q) {
    for (uint64_t d = words[q]; d; d &= d - 1) chunk[64 * q + __builtin_ctzll(d)] = packed[m++];
  }
}

template <typename T, bool kGather, int kIsa>
HFDG_INLINE void move_chunks(const PackSeg& s, int64_t k0, int64_t k1, T* __restrict values,
                             const int64_t* starts) {
  alignas(64) uint32_t lo[kSub];
  alignas(64) uint32_t hi[kSub];
  alignas(64) uint64_t words[kWords];
  T* __restrict data = reinterpret_cast<T*>(s.data);
  for (int64_t k = k0; k < k1; ++k) {
    const Span sp = span_of(s.offset, s.numel, k);
    const int64_t d0 = sp.c * kChunk - s.offset;  // data index of in-chunk position 0
    T* __restrict slots = values + starts[k];
    if (s.threshold == 0) continue;
    if (s.threshold >= 65536) {  // everything dropped: a plain copy
      const int64_t len = sp.hi - sp.lo;
      if (kGather) {
        std::memcpy(slots, data + d0 + sp.lo, len * sizeof(T));
      } else {
        std::memcpy(data + d0 + sp.lo, slots, len * sizeof(T));
      }
      continue;
    }
    drop_words<kIsa, !kGather>(s.key, s.threshold, sp, words, lo, hi,
                                reinterpret_cast<uintptr_t>(data) + d0 * sizeof(T), sizeof(T));
    if (kGather) {
      pack_words(words, data + d0, slots);
    } else {
      unpack_words(words, slots, data + d0);
    }
  }
}

template <bool kGather, int kIsa>
HFDG_INLINE void move_chunks_any(const PackSeg& s, int64_t k0, int64_t k1, int32_t esize,
                                 void* values, const int64_t* starts) {
  switch (esize) {
    case 1:
      move_chunks<uint8_t, kGather, kIsa>(s, k0, k1, static_cast<uint8_t*>(values), starts);
      break;
    case 2:
      move_chunks<uint16_t, kGather, kIsa>(s, k0, k1, static_cast<uint16_t*>(values), starts);
      break;
    case 4:
      move_chunks<uint32_t, kGather, kIsa>(s, k0, k1, static_cast<uint32_t*>(values), starts);
      break;
    default:
      move_chunks<uint64_t, kGather, kIsa>(s, k0, k1, static_cast<uint64_t*>(values), starts);
  }
}

// Full update drop's save fused into the gradient mask (mask_gather_dropped_): each chunk is hashed
// once; the hashes mask the gradient (mask_block) and become the chunk's words of dropped bits,
// whose elements of the source tensor (the parameter: same key, threshold, offset and size) are
// appended to a task's PackOut in position order, and whose count goes to s.counts[k]. A task's
// chunks are consecutive, so what it appends is the values of those chunks, in order.
//
// A task appends into its region of the values tensor, sized from the expected count; what does
// not fit (past the expectation plus a margin: practically never) goes on in a growable buffer.
struct PackOut {
  char* region = nullptr;  // capacity bytes inside the values tensor
  int64_t capacity = 0;
  int64_t bytes = 0;        // appended to the region
  char* overflow = nullptr;  // then, once the region is short, everything else (malloc'd)
  int64_t overflow_bytes = 0;
  int64_t overflow_capacity = 0;
  PackOut() = default;
  PackOut(const PackOut&) = delete;
  PackOut& operator=(const PackOut&) = delete;
  ~PackOut() { std::free(overflow); }
  // Where the next `more` bytes go; commit(more) appends them.
  char* room(int64_t more) {
    if (overflow == nullptr && bytes + more <= capacity) return region + bytes;
    if (overflow_bytes + more > overflow_capacity) {
      const int64_t want = std::max(overflow_bytes + more, 2 * overflow_capacity + kChunk * 8);
      char* grown = static_cast<char*>(std::realloc(overflow, static_cast<size_t>(want)));
      TORCH_CHECK(grown != nullptr, "out of memory packing ", want, " bytes of dropped values");
      overflow = grown;
      overflow_capacity = want;
    }
    return overflow + overflow_bytes;
  }
  void commit(int64_t more) { (overflow == nullptr ? bytes : overflow_bytes) += more; }
};

template <int DT, int kIsa>
HFDG_INLINE void mask_gather_chunks_t(const Seg& s, int64_t k0, int64_t k1, PackOut& out) {
  using T = typename std::conditional<DT == kF32, float, uint16_t>::type;
  alignas(64) uint32_t lo[kSub];
  alignas(64) uint32_t hi[kSub];
  alignas(64) uint64_t words[kWords];
  T* data = static_cast<T*>(s.data);
  const T* source = static_cast<const T*>(s.source);
  for (int64_t k = k0; k < k1; ++k) {
    const Span sp = span_of(s.offset, s.numel, k);
    const uint64_t base = chunk_base(s.key, sp.c);
    const int64_t gs = sp.c * kChunk - s.offset;  // data index of in-chunk position 0
    if (sp.lo == 0 && sp.hi == kChunk) {
      for (int64_t b0 = 0; b0 < kW; b0 += kSub) {
        // the source's runs of this block, read after the chunk is masked
        prefetch_block<false>(reinterpret_cast<uintptr_t>(source + gs), b0, sizeof(T));
        mask_block<DT, kIsa, false>(s, base, data + gs, b0, lo, hi);
        for (int j = 0; j < 4; ++j) {
          words[(j * kW + b0) / 64] = drop_bits<kIsa>(j < 2 ? lo : hi, (j & 1) * 16, s.threshold);
        }
      }
    } else {  // a tensor's first or last chunk: mask, then hash again for the bits (rare)
      for_partial_chunk<kIsa>(
          base, sp, lo, hi,
          [&](int64_t a, const uint32_t* w, int shift, int64_t cnt) HFDG_LAMBDA_INLINE {
            apply_dt<DT, kIsa>(data + gs + a, w, shift, cnt, s.threshold, s.scale);
          });
      drop_words<kIsa>(s.key, s.threshold, sp, words, lo, hi);
    }
    int64_t dropped = 0;
    for (int q = 0; q < kWords; ++q) dropped += __builtin_popcountll(words[q]);
    const int64_t bytes = dropped * static_cast<int64_t>(sizeof(T));
    pack_words(words, source + gs, reinterpret_cast<T*>(out.room(bytes)));
    out.commit(bytes);
    s.counts[k] = dropped;
  }
}

template <int kIsa>
HFDG_INLINE void mask_gather_chunks(const Seg& s, int64_t k0, int64_t k1, PackOut& out) {
  by_dtype(s.dtype, [&](auto dt) HFDG_LAMBDA_INLINE {
    mask_gather_chunks_t<decltype(dt)::value, kIsa>(s, k0, k1, out);
  });
}

// The chunk loops of one code path, compiled for its ISA; the ops call them through kernels().
struct Kernels {
  void (*mask)(const Seg& s, int64_t k0, int64_t k1);
  void (*mask_counted)(const Seg& s, int64_t k0, int64_t k1);
  void (*keep)(uint8_t* out, int64_t off, int64_t n, uint64_t key, uint32_t t, int64_t k0,
               int64_t k1);
  void (*count)(const PackSeg& s, int64_t k0, int64_t k1, int64_t* counts);
  void (*gather)(const PackSeg& s, int64_t k0, int64_t k1, int32_t esize, void* values,
                 const int64_t* starts);
  void (*scatter)(const PackSeg& s, int64_t k0, int64_t k1, int32_t esize, void* values,
                  const int64_t* starts);
  void (*mask_gather)(const Seg& s, int64_t k0, int64_t k1, PackOut& out);
};

// Defines the entry points of code path ISA (suffix NAME, function attribute ATTR) and their table
// kernels_NAME: the same templates, instantiated inside a function compiled for that ISA.
#define HFDG_DEFINE_KERNELS(NAME, ISA, ATTR)                                                   \
  ATTR void mask_##NAME(const Seg& s, int64_t k0, int64_t k1) {                               \
    mask_chunks<ISA, false>(s, k0, k1);                                                        \
  }                                                                                            \
  ATTR void mask_counted_##NAME(const Seg& s, int64_t k0, int64_t k1) {                       \
    mask_chunks<ISA, true>(s, k0, k1);                                                         \
  }                                                                                            \
  ATTR void keep_##NAME(uint8_t* out, int64_t off, int64_t n, uint64_t key, uint32_t t,       \
                        int64_t k0, int64_t k1) {                                              \
    keep_chunks<ISA>(out, off, n, key, t, k0, k1);                                             \
  }                                                                                            \
  ATTR void count_##NAME(const PackSeg& s, int64_t k0, int64_t k1, int64_t* counts) {         \
    count_chunks<ISA>(s, k0, k1, counts);                                                      \
  }                                                                                            \
  ATTR void gather_##NAME(const PackSeg& s, int64_t k0, int64_t k1, int32_t esize,            \
                          void* values, const int64_t* starts) {                               \
    move_chunks_any<true, ISA>(s, k0, k1, esize, values, starts);                              \
  }                                                                                            \
  ATTR void scatter_##NAME(const PackSeg& s, int64_t k0, int64_t k1, int32_t esize,           \
                           void* values, const int64_t* starts) {                              \
    move_chunks_any<false, ISA>(s, k0, k1, esize, values, starts);                             \
  }                                                                                            \
  ATTR void mask_gather_##NAME(const Seg& s, int64_t k0, int64_t k1, PackOut& out) {       \
    mask_gather_chunks<ISA>(s, k0, k1, out);                                                   \
  }                                                                                            \
  constexpr Kernels kernels_##NAME{mask_##NAME,   mask_counted_##NAME, keep_##NAME,           \
                                   count_##NAME,  gather_##NAME,       scatter_##NAME,        \
                                   mask_gather_##NAME};

HFDG_DEFINE_KERNELS(portable, kIsaPortable, )
#ifdef HFDG_X86
HFDG_DEFINE_KERNELS(avx2, kIsaAvx2, HFDG_TARGET_AVX2)
HFDG_DEFINE_KERNELS(avx512, kIsaAvx512, HFDG_TARGET_AVX512)
constexpr Kernels kAllKernels[] = {kernels_portable, kernels_avx2, kernels_avx512};

// The best code path this CPU runs.
int best_isa() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c")) return kIsaPortable;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return avx512 ? kIsaAvx512 : kIsaAvx2;
}
#else
constexpr Kernels kAllKernels[] = {kernels_portable};
int best_isa() { return kIsaPortable; }
#endif
#undef HFDG_DEFINE_KERNELS

int g_isa = best_isa();  // the code path in use (tests select the others with _cpu_isa)

const Kernels& kernels() { return kAllKernels[g_isa]; }

HFDG_INLINE int64_t grain_of(int64_t elements, int64_t chunks) {
  return elements < kMinParallelElements ? std::max<int64_t>(1, chunks) : kGrainChunks;
}

// Chunks [begin, end) of the list-wide numbering, split at segment boundaries: first[i] is the
// first (list-wide) chunk of segment i, first.back() the total; fn(i, k0, k1) handles chunks
// [k0, k1) of segment i.
template <typename Fn>
HFDG_INLINE void for_chunk_range(const std::vector<int64_t>& first, int64_t begin, int64_t end,
                                 const Fn& fn) {
  int64_t i = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
  while (begin < end) {
    const int64_t stop = std::min(end, first[i + 1]);
    fn(i, begin - first[i], stop - first[i]);
    begin = stop;
    ++i;
  }
}

// One parallel region over the chunks of all segments (for_chunk_range's fn).
template <typename Fn>
void for_all_chunks(const std::vector<int64_t>& first, int64_t elements, const Fn& fn) {
  const int64_t total = first.back();
  at::parallel_for(0, total, grain_of(elements, total),
                   [&](int64_t begin, int64_t end) { for_chunk_range(first, begin, end, fn); });
}

uint32_t checked_threshold(int64_t t) {
  TORCH_CHECK_VALUE(0 <= t && t <= 65536, "threshold must be in [0, 65536], got ", t);
  return static_cast<uint32_t>(t);
}

// Where tensor i's runs sit (see the top of this file), checked: run r of a tensor of numel
// elements holds elements [first + r * run, first + (r + 1) * run) at stream offset
// off + r * stride.
struct Runs {
  int64_t off, run, stride, rows;
};

constexpr int64_t kMaxOffset = int64_t{1} << 62;

Runs runs_of(int64_t i, int64_t numel, at::IntArrayRef offsets, at::IntArrayRef runs,
             at::IntArrayRef strides) {
  const int64_t off = offsets[i], run = runs[i], stride = strides[i];
  TORCH_CHECK_VALUE(0 <= off && off < kMaxOffset, "offsets[", i, "] must be in [0, 2**62), got ",
                    off);
  if (numel == 0) return Runs{off, 0, 0, 0};
  TORCH_CHECK_VALUE(run > 0 && numel % run == 0, "runs[", i, "] must divide the tensor's ", numel,
                    " elements, got ", run);
  const int64_t rows = numel / run;
  TORCH_CHECK_VALUE(rows == 1 || stride >= run, "strides[", i, "] must be >= runs[", i, "] (",
                    run, ") so runs do not overlap, got ", stride);
  TORCH_CHECK_VALUE(rows == 1 || (kMaxOffset - off - run) / (rows - 1) >= stride,
                    "tensor ", i, "'s last element lies past 2**62");
  return Runs{off, run, rows == 1 ? run : stride, rows};
}

void check_lengths(int64_t n, int64_t keys, int64_t thresholds, int64_t offsets, int64_t runs,
                   int64_t strides) {
  TORCH_CHECK_VALUE(keys == n && thresholds == n && offsets == n && runs == n && strides == n,
                    "tensors, keys, thresholds, offsets, runs and strides differ in length: ", n,
                    ", ", keys, ", ", thresholds, ", ", offsets, ", ", runs, ", ", strides);
}

// ----------------------------------------------------------------------------- the ops (CPU)
// Keys arrive as int64 bit patterns (the schema has no unsigned type); thresholds in [0, 65536];
// offsets are global stream indices in [0, 2**62). Argument errors are ValueErrors in Python.

void check_starts(const at::Tensor& starts, int64_t total) {
  TORCH_CHECK_VALUE(starts.device().is_cpu() && starts.scalar_type() == at::kLong &&
                        starts.is_contiguous() && starts.numel() == total + 1,
                    "starts must be a contiguous int64 CPU tensor of ", total + 1, " elements");
}

// The segments of a mask call (one per run), for the gradients that are not left unchanged
// (threshold 0 with scale 1); first/elements as for for_all_chunks. With st (or nullptr), each
// segment's counts point at st[1 + its first chunk] in the numbering of all the grads, and a
// skipped gradient's counts are zeroed. With sources (mask_gather_dropped_), each segment's source
// is the matching run of sources[i].
std::vector<Seg> mask_segs(at::TensorList grads, at::IntArrayRef keys, at::IntArrayRef thresholds,
                           at::ArrayRef<double> scales, at::IntArrayRef offsets,
                           at::IntArrayRef runs, at::IntArrayRef strides, int64_t* st,
                           const at::TensorList* sources, std::vector<int64_t>& first,
                           int64_t& elements) {
  const int64_t n = static_cast<int64_t>(grads.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(scales.size()) == n, "grads and scales differ in length");
  check_lengths(n, keys.size(), thresholds.size(), offsets.size(), runs.size(), strides.size());
  std::vector<Seg> segs;
  segs.reserve(n);
  first.assign(1, 0);
  elements = 0;
  int64_t counted = 0;  // chunks of the runs before, the index of the next run's first count
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(g.device().is_cpu() && g.layout() == at::kStrided && g.is_contiguous(),
                      "grads[", i, "] must be a contiguous dense CPU tensor");
    int32_t dtype;
    switch (g.scalar_type()) {
      case at::kFloat:
        dtype = kF32;
        break;
      case at::kBFloat16:
        dtype = kBF16;
        break;
      case at::kHalf:
        dtype = kF16;
        break;
      default:
        TORCH_CHECK_VALUE(false, "grads[", i, "] must be float32/bfloat16/float16, got ",
                          g.scalar_type());
    }
    const char* source = nullptr;
    if (sources != nullptr) {
      const at::Tensor& x = (*sources)[i];
      TORCH_CHECK_VALUE(x.device().is_cpu() && x.layout() == at::kStrided && x.is_contiguous() &&
                            x.numel() == g.numel() && x.element_size() == g.element_size() &&
                            x.scalar_type() == (*sources)[0].scalar_type(),
                        "tensors[", i, "] must be a contiguous dense CPU tensor of grads[", i,
                        "]'s size and element size, of tensors[0]'s dtype");
      source = static_cast<const char*>(x.data_ptr());
    }
    const uint32_t t = checked_threshold(thresholds[i]);
    const float scale = static_cast<float>(scales[i]);
    const Runs rs = runs_of(i, g.numel(), offsets, runs, strides);
    // threshold 0 with scale 1 keeps everything unchanged: skip the pass (nothing is dropped).
    const bool skip = g.numel() == 0 || (t == 0 && scale == 1.0f);
    const int64_t esize = g.element_size();
    for (int64_t r = 0; r < rs.rows; ++r) {
      const int64_t off = rs.off + r * rs.stride;
      const int64_t chunks = num_chunks(off, rs.run);
      int64_t* counts = st == nullptr ? nullptr : st + 1 + counted;
      counted += chunks;
      if (skip) {
        if (counts != nullptr) std::fill(counts, counts + chunks, int64_t{0});
        continue;
      }
      const int64_t at_byte = r * rs.run * esize;
      segs.push_back(Seg{static_cast<char*>(g.data_ptr()) + at_byte, rs.run, off,
                         static_cast<uint64_t>(keys[i]), t, scale, dtype, counts,
                         source == nullptr ? nullptr : source + at_byte});
      first.push_back(first.back() + chunks);
      elements += rs.run;
    }
  }
  return segs;
}

int64_t chunks_of(at::TensorList tensors, at::IntArrayRef offsets, at::IntArrayRef runs,
                  at::IntArrayRef strides) {
  int64_t total = 0;
  const int64_t n = static_cast<int64_t>(tensors.size());
  check_lengths(n, n, n, offsets.size(), runs.size(), strides.size());
  for (int64_t i = 0; i < n; ++i) {
    const Runs rs = runs_of(i, tensors[i].numel(), offsets, runs, strides);
    for (int64_t r = 0; r < rs.rows; ++r) total += num_chunks(rs.off + r * rs.stride, rs.run);
  }
  return total;
}

// Chunk counts at st[1, total] to chunk starts at st[0, total].
void prefix_sum(int64_t* st, int64_t total) {
  st[0] = 0;
  for (int64_t c = 0; c < total; ++c) st[c + 1] += st[c];
}

// st (or nullptr): the chunk starts of the dropped elements, filled as gather_dropped_many's.
void mask_impl(at::TensorList grads, at::IntArrayRef keys, at::IntArrayRef thresholds,
               at::ArrayRef<double> scales, at::IntArrayRef offsets, at::IntArrayRef runs,
               at::IntArrayRef strides, int64_t* st, int64_t total) {
  std::vector<int64_t> first;
  int64_t elements;
  const std::vector<Seg> segs = mask_segs(grads, keys, thresholds, scales, offsets, runs, strides,
                                          st, nullptr, first, elements);
  const auto mask = st == nullptr ? kernels().mask : kernels().mask_counted;
  for_all_chunks(first, elements, [&](int64_t i, int64_t k0, int64_t k1) {
    mask(segs[i], k0, k1);
  });
  if (st != nullptr) prefix_sum(st, total);
}

void mask_cpu(at::TensorList grads, at::IntArrayRef keys, at::IntArrayRef thresholds,
              at::ArrayRef<double> scales, at::IntArrayRef offsets, at::IntArrayRef runs,
              at::IntArrayRef strides) {
  mask_impl(grads, keys, thresholds, scales, offsets, runs, strides, nullptr, 0);
}

// mask_ that also fills `starts` (int64, one per chunk of the grads plus the total) with the chunk
// starts gather_dropped_many would return for tensors of the grads' sizes, keys, thresholds and
// offsets: the counts come from the hashes the mask makes anyway.
void mask_counted_cpu(at::TensorList grads, at::IntArrayRef keys, at::IntArrayRef thresholds,
                      at::ArrayRef<double> scales, at::IntArrayRef offsets, at::IntArrayRef runs,
                      at::IntArrayRef strides, const at::Tensor& starts) {
  const int64_t total = chunks_of(grads, offsets, runs, strides);
  check_starts(starts, total);
  mask_impl(grads, keys, thresholds, scales, offsets, runs, strides, starts.data_ptr<int64_t>(),
            total);
}

// mask_counted_, and the dropped elements of tensors[i] (the parameter of grads[i]: same size,
// element size, key, threshold and offset) packed as gather_dropped_at packs them: one hashing
// pass for both. The chunks are split into one consecutive range per thread; each range gets a
// region of the values tensor sized from its expected count (2% and 4096 elements of margin), and
// the regions are then moved together (one memmove per range): the values tensor is one
// allocation, a little larger than the values.
// A task's region: g_pack_factor times its expected count, plus g_pack_slack elements (tests
// shrink them to run the overflow path).
double g_pack_factor = 1.02;
int64_t g_pack_slack = kChunk;

std::tuple<at::Tensor, at::Tensor> mask_gather_dropped_cpu(
    at::TensorList grads, at::TensorList tensors, at::IntArrayRef keys,
    at::IntArrayRef thresholds, at::ArrayRef<double> scales, at::IntArrayRef offsets,
    at::IntArrayRef runs, at::IntArrayRef strides) {
  TORCH_CHECK_VALUE(tensors.size() == grads.size(), "grads and tensors differ in length: ",
                    grads.size(), ", ", tensors.size());
  const int64_t all = chunks_of(grads, offsets, runs, strides);
  at::Tensor starts = at::empty({all + 1}, at::TensorOptions().dtype(at::kLong));
  int64_t* st = starts.data_ptr<int64_t>();
  std::vector<int64_t> first;
  int64_t elements;
  const std::vector<Seg> segs = mask_segs(grads, keys, thresholds, scales, offsets, runs, strides,
                                          st, &tensors, first, elements);
  const at::ScalarType dtype = tensors.empty() ? at::kFloat : tensors[0].scalar_type();
  const int64_t esize = c10::elementSize(dtype);
  const int64_t total = first.back();
  const int64_t tasks =
      elements < kMinParallelElements
          ? std::min<int64_t>(total, 1)
          : std::min<int64_t>(at::get_num_threads(), (total + kGrainChunks - 1) / kGrainChunks);
  // Task t: chunks [from[t], from[t + 1]) of the kept segments, its values region at byte
  // where[t] of the values tensor.
  std::vector<int64_t> from(tasks + 1), where(tasks + 1, 0), index(tasks, 0);
  for (int64_t t = 0; t <= tasks; ++t) from[t] = total * t / std::max<int64_t>(tasks, 1);
  for (int64_t t = 0; t < tasks; ++t) {
    double expected = 0;
    bool first_piece = true;
    for_chunk_range(first, from[t], from[t + 1], [&](int64_t i, int64_t k0, int64_t k1) {
      if (first_piece) index[t] = segs[i].counts - (st + 1) + k0;  // in the numbering of all
      first_piece = false;
      expected += static_cast<double>((k1 - k0) * kChunk) * segs[i].threshold / 65536.0;
    });
    const int64_t room = static_cast<int64_t>(expected * g_pack_factor) + g_pack_slack;
    where[t + 1] = where[t] + room * esize;
  }
  at::Tensor values = at::empty({where[tasks] / esize}, at::TensorOptions().dtype(dtype));
  char* base = static_cast<char*>(values.data_ptr());
  std::vector<PackOut> outs(tasks);
  const auto mask_gather = kernels().mask_gather;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      outs[t].region = base + where[t];
      outs[t].capacity = where[t + 1] - where[t];
      for_chunk_range(first, from[t], from[t + 1], [&](int64_t i, int64_t k0, int64_t k1) {
        mask_gather(segs[i], k0, k1, outs[t]);
      });
    }
  });
  prefix_sum(st, all);
  bool overflowed = false;
  for (const PackOut& out : outs) overflowed = overflowed || out.overflow != nullptr;
  at::Tensor packed = overflowed ? at::empty({st[all]}, values.options()) : values;
  char* dst = static_cast<char*>(packed.data_ptr());
  for (int64_t t = 0; t < tasks; ++t) {  // in order: a range's values move down, never up
    char* to = dst + st[index[t]] * esize;
    std::memmove(to, base + where[t], outs[t].bytes);
    if (outs[t].overflow_bytes > 0) {
      std::memcpy(to + outs[t].bytes, outs[t].overflow, outs[t].overflow_bytes);
    }
  }
  return {overflowed ? packed : values.resize_({st[all]}), starts};
}

// out[e] = keep decision of stream element offset + e (1 keep, 0 drop).
void keep_mask_cpu(const at::Tensor& out, int64_t key, int64_t threshold, int64_t offset) {
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.scalar_type() == at::kBool &&
                        out.is_contiguous(),
                    "out must be a contiguous bool CPU tensor");
  TORCH_CHECK_VALUE(0 <= offset && offset < kMaxOffset, "offset must be in [0, 2**62), got ", offset);
  const uint32_t t = checked_threshold(threshold);
  const int64_t n = out.numel();
  uint8_t* data = static_cast<uint8_t*>(out.data_ptr());
  const uint64_t k = static_cast<uint64_t>(key);
  const Kernels& ks = kernels();
  const int64_t chunks = num_chunks(offset, n);
  at::parallel_for(0, chunks, grain_of(n, chunks), [&](int64_t k0, int64_t k1) {
    ks.keep(data, offset, n, k, t, k0, k1);
  });
}

std::vector<PackSeg> pack_segs(at::TensorList tensors, at::IntArrayRef keys,
                               at::IntArrayRef thresholds, at::IntArrayRef offsets,
                               at::IntArrayRef runs, at::IntArrayRef strides,
                               std::vector<int64_t>& first, int64_t& elements) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  check_lengths(n, keys.size(), thresholds.size(), offsets.size(), runs.size(), strides.size());
  std::vector<PackSeg> segs;
  segs.reserve(n);
  first.assign(1, 0);
  elements = 0;
  const int64_t esize = n ? tensors[0].element_size() : 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& x = tensors[i];
    TORCH_CHECK_VALUE(x.device().is_cpu() && x.layout() == at::kStrided && x.is_contiguous(),
                      "tensors[", i, "] must be a contiguous dense CPU tensor");
    TORCH_CHECK_VALUE(x.element_size() == esize && (esize == 1 || esize == 2 || esize == 4 ||
                                                     esize == 8),
                      "tensors must share one element size of 1, 2, 4 or 8 bytes; tensors[", i,
                      "] has ", x.element_size(), " and tensors[0] ", esize);
    const uint32_t t = checked_threshold(thresholds[i]);
    const Runs rs = runs_of(i, x.numel(), offsets, runs, strides);
    for (int64_t r = 0; r < rs.rows; ++r) {
      const int64_t off = rs.off + r * rs.stride;
      segs.push_back(PackSeg{static_cast<char*>(x.data_ptr()) + r * rs.run * esize, rs.run, off,
                             static_cast<uint64_t>(keys[i]), t});
      first.push_back(first.back() + num_chunks(off, rs.run));
      elements += rs.run;
    }
  }
  return segs;
}

// The packing pass: the dropped elements of every chunk to values[st[c], st[c + 1]).
at::Tensor gather_pass(at::TensorList tensors, const std::vector<PackSeg>& segs,
                       const std::vector<int64_t>& first, int64_t elements, const int64_t* st) {
  const int64_t total = first.back();
  TORCH_CHECK_VALUE(st[0] == 0 && st[total] >= 0, "starts must begin at 0 and end at >= 0");
  at::Tensor values = at::empty(
      {st[total]}, at::TensorOptions().dtype(tensors.empty() ? at::kFloat
                                                               : tensors[0].scalar_type()));
  const Kernels& ks = kernels();
  if (st[total] > 0) {
    const int32_t esize = static_cast<int32_t>(values.element_size());
    void* out = values.data_ptr();
    for_all_chunks(first, elements, [&](int64_t i, int64_t k0, int64_t k1) {
      const int64_t* s = st + first[i];
      ks.gather(segs[i], k0, k1, esize, out, s);
    });
  }
  return values;
}

std::tuple<at::Tensor, at::Tensor> gather_dropped_many_cpu(
    at::TensorList tensors, at::IntArrayRef keys, at::IntArrayRef thresholds,
    at::IntArrayRef offsets, at::IntArrayRef runs, at::IntArrayRef strides) {
  std::vector<int64_t> first;
  int64_t elements;
  const std::vector<PackSeg> segs =
      pack_segs(tensors, keys, thresholds, offsets, runs, strides, first, elements);
  const int64_t total = first.back();
  at::Tensor starts = at::empty({total + 1}, at::TensorOptions().dtype(at::kLong));
  int64_t* st = starts.data_ptr<int64_t>();
  const Kernels& ks = kernels();
  for_all_chunks(first, elements, [&](int64_t i, int64_t k0, int64_t k1) {
    ks.count(segs[i], k0, k1, st + 1 + first[i]);
  });
  prefix_sum(st, total);
  return {gather_pass(tensors, segs, first, elements, st), starts};
}

// The packing pass of gather_dropped_many with the chunk starts already known (from mask_counted_
// over the gradients of these tensors): no counting pass.
at::Tensor gather_dropped_at_cpu(at::TensorList tensors, at::IntArrayRef keys,
                                 at::IntArrayRef thresholds, at::IntArrayRef offsets,
                                 at::IntArrayRef runs, at::IntArrayRef strides,
                                 const at::Tensor& starts) {
  std::vector<int64_t> first;
  int64_t elements;
  const std::vector<PackSeg> segs =
      pack_segs(tensors, keys, thresholds, offsets, runs, strides, first, elements);
  check_starts(starts, first.back());
  return gather_pass(tensors, segs, first, elements, starts.data_ptr<int64_t>());
}

void scatter_dropped_many_cpu(at::TensorList tensors, at::IntArrayRef keys,
                              at::IntArrayRef thresholds, at::IntArrayRef offsets,
                              at::IntArrayRef runs, at::IntArrayRef strides,
                              const at::Tensor& values, const at::Tensor& starts) {
  std::vector<int64_t> first;
  int64_t elements;
  const std::vector<PackSeg> segs =
      pack_segs(tensors, keys, thresholds, offsets, runs, strides, first, elements);
  const int64_t total = first.back();
  TORCH_CHECK_VALUE(starts.device().is_cpu() && starts.scalar_type() == at::kLong &&
                        starts.is_contiguous() && starts.numel() == total + 1,
                    "starts must be a contiguous int64 CPU tensor of ", total + 1, " elements");
  const int64_t* st = starts.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(values.device().is_cpu() && values.is_contiguous() &&
                        values.numel() == st[total] &&
                        (tensors.empty() || values.element_size() == tensors[0].element_size()),
                    "values must be a contiguous CPU tensor of ", st[total],
                    " elements of the tensors' element size");
  if (st[total] == 0) return;
  const int32_t esize = static_cast<int32_t>(values.element_size());
  void* in = values.data_ptr();
  const Kernels& ks = kernels();
  for_all_chunks(first, elements, [&](int64_t i, int64_t k0, int64_t k1) {
    ks.scatter(segs[i], k0, k1, esize, in, st + first[i]);
  });
}

// request < 0: report the code path in use (2 AVX-512, 1 AVX2, 0 portable); >= 0: select that
// path, or the best this CPU runs if it cannot run it (tests check every path against the others),
// and report the one in use.
int64_t cpu_isa(int64_t request) {
  if (request >= 0) g_isa = static_cast<int>(std::min<int64_t>(request, best_isa()));
  return g_isa;
}

}  // namespace

// The schemas are defined in Python (hf_dropgrad/kernels/ops.py), so the ops exist without this
// library; it adds their CPU kernels, and one CPU-only helper op of its own.
// Sets mask_gather_dropped_'s region margins (defaults 1.02 and 4096); tests only.
void cpu_pack_margin(double factor, int64_t slack) {
  TORCH_CHECK_VALUE(factor >= 0 && slack >= 0, "factor and slack must be >= 0");
  g_pack_factor = factor;
  g_pack_slack = slack;
}

TORCH_LIBRARY_FRAGMENT(hf_dropgrad, m) {
  m.def("_cpu_isa(int request) -> int", &cpu_isa);
  m.def("_cpu_pack_margin(float factor, int slack) -> ()", &cpu_pack_margin);
}

TORCH_LIBRARY_IMPL(hf_dropgrad, CPU, m) {
  m.impl("mask_", &mask_cpu);
  m.impl("mask_counted_", &mask_counted_cpu);
  m.impl("keep_mask_", &keep_mask_cpu);
  m.impl("gather_dropped_many", &gather_dropped_many_cpu);
  m.impl("gather_dropped_at", &gather_dropped_at_cpu);
  m.impl("mask_gather_dropped_", &mask_gather_dropped_cpu);
  m.impl("scatter_dropped_many", &scatter_dropped_many_cpu);
}
