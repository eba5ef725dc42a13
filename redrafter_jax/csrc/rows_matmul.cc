// y[M, O] = x[M, K] @ w for a few rows M, with w packed as [O / 32, K, 32] (32-column tiles, each one
// contiguous). XLA:CPU runs one row as a matrix-vector product at memory speed but 2-16 rows through a
// general matrix multiply at about half that; here every tile streams its weights once per pass of up
// to 12 rows (AVX-512; with AVX2, 6 rows of half a tile) and keeps their sums in registers. Each output
// is one chain of fused multiply-adds over k = 0..K-1, so a row's result does not depend on M or on the
// threads: a one-token step and an N-token tree verification compute bitwise the same products. The
// weights may be float32 or bfloat16 (half the bytes to stream). With bfloat16 weights x is rounded to
// bfloat16 too, as GPUs multiply, and the exact products are summed in float32. Where the CPU multiplies
// bfloat16 pairs itself, the weights are packed as k-pairs (`pairs`) and its unit computes them: AMX's
// tiles (Intel Sapphire Rapids and later), 16 rows for about the cost of one, or else AVX512-BF16's dot
// products (AMD Zen 4 and later, Intel Cooper Lake), 32 products per instruction where the plain path
// does 16 and converts the weights.
// Every product is grouped: w holds G weights [G, O / 32, K, 32] and the rows come in runs, sizes[g] of
// them for weight g (a mixture of experts' rows sorted by expert; G = 1 for a plain product), so a
// layer's experts are one call that streams only the experts with rows.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define REDRAFTER_AMX 1
#endif
#if defined(REDRAFTER_AMX) || defined(__AVX512BF16__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace redrafter;

namespace {

constexpr int64_t kTile = 32;  // columns per tile
// A pass covers a slice of two registers' columns of a tile (all 32 with AVX-512, 16 with AVX2) for as
// many rows as keep their sums, the slice's weights and x's broadcast in registers: 12 rows with AVX-512,
// 6 with AVX2 (a whole AVX2 tile row takes four registers, which left room for 2 rows, and at 3 a sum
// spilled to the stack: 16 rows ran 1.6x slower).
constexpr int64_t kVecs = 2;  // registers per slice row
constexpr int64_t kSlice = kVecs * kLanes;  // columns per slice
constexpr int64_t kRows = std::min(kAccumulators, kRegisters - kVecs - 1) / kVecs;
constexpr int64_t kAhead = 32;  // weight rows of this tile prefetched ahead
constexpr int64_t kLine = 64;   // bytes per cache line
constexpr int64_t kPairK = 32;  // k-pairs layout: K zero-padded to whole AMX tile products of 32 k (16 pairs)
constexpr int64_t kMxfp4Block = 32;  // MXFP4: inputs sharing a scale
static_assert(kTile % kSlice == 0 && kRows >= 1);

// The weights of one slice row as registers: 4-byte words as they are (float32, or AVX512-BF16's k-pairs).
template <typename W>
inline void Load(const W* w, Vec (&wv)[kVecs]) {
  static_assert(sizeof(W) == sizeof(float));
  for (int i = 0; i < kVecs; ++i) wv[i] = *reinterpret_cast<const Vec*>(w + i * kLanes);
}
inline void Load(const uint16_t* w, Vec (&wv)[kVecs]) {  // bfloat16: the top half of a float32's bits
  for (int i = 0; i < kVecs; ++i)
    wv[i] = reinterpret_cast<Vec>(__builtin_convertvector(*reinterpret_cast<const Half*>(w + i * kLanes), Word) << 16);
}

// acc += x * w for one row: x a float32 and w a slice row, or (AVX512-BF16) x a k-pair of bfloat16s and w
// the tile's 32 k-pairs, loaded as they are, each lane adding both products.
inline void Madd(Vec (&acc)[kVecs], float x, const Vec (&wv)[kVecs]) {
  for (int i = 0; i < kVecs; ++i) acc[i] += x * wv[i];
}
#ifdef __AVX512BF16__
inline void Madd(Vec (&acc)[kVecs], uint32_t x, const Vec (&wv)[kVecs]) {
  const __m512bh xx = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(x)));
  for (int i = 0; i < kVecs; ++i) {
    acc[i] = reinterpret_cast<Vec>(
        _mm512_dpbf16_ps(reinterpret_cast<__m512>(acc[i]), xx, reinterpret_cast<__m512bh>(wv[i])));
  }
}
#endif

// R rows' sums of one slice into y (rows o_dim apart).
template <int R>
inline void Store(const Vec (&acc)[R][kVecs], float* y, int64_t o_dim) {
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kVecs; ++i) *reinterpret_cast<Vec*>(y + r * o_dim + i * kLanes) = acc[r][i];
}

// One pass of R rows over a slice of a tile (w: the slice's first column; k: a weight row, or with
// k-pairs a pair of them). The first pass prefetches the tile into L1; while it computes, a pass also
// prefetches `lines` cache lines per k of the thread's next tile (from `next`) into L2, so that memory
// keeps streaming while the passes compute: without it, the passes after the first one ran from cache
// with memory idle.
template <int R, typename X, typename W>
void TilePass(const X* x, const W* w, float* y, int64_t k_dim, int64_t o_dim, bool first,
              const char* next, int lines) {
  constexpr int64_t kRowBytes = kTile * sizeof(W);
  Vec acc[R][kVecs] = {};
  for (int64_t k = 0; k < k_dim; ++k) {
    Vec wv[kVecs];
    Load(w + k * kTile, wv);
    if (first) {  // this tile into L1, kAhead rows ahead (never faults)
      for (int64_t b = 0; b < kRowBytes; b += kLine) {
        __builtin_prefetch(reinterpret_cast<const char*>(w + (k + kAhead) * kTile) + b);
      }
    }
    for (int i = 0; i < lines; ++i) __builtin_prefetch(next + (k * lines + i) * kLine, 0, 1);
    for (int r = 0; r < R; ++r) Madd(acc[r], x[r * k_dim + k], wv);
  }
  Store(acc, y, o_dim);
}

template <typename X, typename W>
using Pass = void (*)(const X*, const W*, float*, int64_t, int64_t, bool, const char*, int);
template <typename X, typename W, int64_t... R>
constexpr auto kPasses(std::integer_sequence<int64_t, R...>) {
  return std::array<Pass<X, W>, sizeof...(R)>{TilePass<R + 1, X, W>...};
}

// All rows of one tile, slice by slice in passes of up to kRows; the next tile's K x L lines (L = 2 for
// float32, 1 for bfloat16, 2 for k-pairs) are prefetched over the passes: L per k in a single pass, else
// one per k in each of the first L.
template <typename X, typename W>
void Tile(const X* x, const W* w, float* y, int64_t m, int64_t k_dim, int64_t o_dim, const W* next) {
  static constexpr auto pass = kPasses<X, W>(std::make_integer_sequence<int64_t, kRows>{});
  constexpr int kLinesPerRow = kTile * sizeof(W) / kLine;
  const int64_t row_passes = (m + kRows - 1) / kRows, passes = row_passes * (kTile / kSlice);
  const int64_t rows = (m + row_passes - 1) / row_passes;  // per pass, evened out: 8 rows as 4 + 4, not 6 + 2
  for (int64_t q = 0; q < passes; ++q) {
    const int64_t col = q / row_passes * kSlice, row = q % row_passes * rows;
    const int lines = next == nullptr || q >= kLinesPerRow ? 0 : passes == 1 ? kLinesPerRow : 1;
    const char* ahead = lines ? reinterpret_cast<const char*>(next) + q * k_dim * kLine : nullptr;
    pass[std::min(rows, m - row) - 1](x + row * k_dim, w + col, y + row * o_dim + col, k_dim, o_dim, q == 0, ahead,
                                      lines);
  }
}

// float32 -> bfloat16, rounded to nearest even (NaN stays NaN).
inline uint16_t ToBfloat16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  if ((b & 0x7fffffff) > 0x7f800000) return 0x7fc0;
  return static_cast<uint16_t>((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

// Runs fn(tile, t, row0, rows, next) for every tile t of each group g with rows: `tile` = g * tiles + t
// (the tile's index in w), its group's rows row0 .. row0 + rows - 1, and `next` the tile index of the
// task this thread runs next (-1 if none: `Tile` prefetches it). Refuses sizes that are not G counts
// >= 0 summing to m.
template <typename Fn>
ffi::Error ForEachTile(ffi::ThreadPool& pool, ffi::Buffer<ffi::S32> sizes, int64_t m, int64_t groups, int64_t tiles,
                       Fn fn) {
  if (sizes.dimensions().size() != 1 || sizes.dimensions()[0] != groups) {
    return ffi::Error::InvalidArgument("rows_matmul: expects sizes [G], one count of rows per weight group");
  }
  constexpr auto kBadSizes = "rows_matmul: the groups' sizes must be counts >= 0 that sum to the rows";
  std::vector<int64_t> used, first, count;  // the groups with rows: index, first row, rows
  int64_t row = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t n = sizes.typed_data()[g];
    if (n < 0 || n > m - row) return ffi::Error::InvalidArgument(kBadSizes);
    if (n > 0) used.push_back(g), first.push_back(row), count.push_back(n);
    row += n;
  }
  if (row != m) return ffi::Error::InvalidArgument(kBadSizes);
  const int64_t n_tasks = static_cast<int64_t>(used.size()) * tiles;
  ParallelFor(pool, n_tasks, [=](int64_t i, int64_t after) {
    const int64_t j = i / tiles, next = after < n_tasks ? used[after / tiles] * tiles + after % tiles : -1;
    fn(used[j] * tiles + i % tiles, i % tiles, first[j], count[j], next);
  });
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w, ffi::Buffer<ffi::S32> sizes,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[3] != kTile || wd[2] != xd[1]) {
    return ffi::Error::InvalidArgument("rows_matmul: expects x [M, K] and w [G, O / 32, K, 32]");
  }
  const int64_t m = xd[0], k_dim = xd[1], tiles = wd[1], o_dim = tiles * kTile;
  std::vector<float> rounded;  // bfloat16 weights: x rounded to bfloat16 as well
  if constexpr (T == ffi::BF16) {
    rounded.resize(m * k_dim);
    for (int64_t i = 0; i < m * k_dim; ++i) {
      const uint32_t b = static_cast<uint32_t>(ToBfloat16(x.typed_data()[i])) << 16;
      std::memcpy(&rounded[i], &b, sizeof b);
    }
  }
  const float* xp = rounded.empty() ? x.typed_data() : rounded.data();
  const auto* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t size = k_dim * kTile;  // one tile's weights
  return ForEachTile(pool, sizes, m, wd[0], tiles, [=](int64_t tile, int64_t t, int64_t row0, int64_t rows,
                                                       int64_t next) {
    Tile(xp + row0 * k_dim, wp + tile * size, yp + row0 * o_dim + t * kTile, rows, k_dim, o_dim,
         next < 0 ? nullptr : wp + next * size);
  });
}

#ifdef REDRAFTER_AMX
constexpr int64_t kAmxRows = 16;  // rows of an AMX tile
constexpr int64_t kAmxAhead = 2;  // k-steps of weights prefetched ahead (4 KB)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All rows of one 32-column tile w [Kp / 2, 32, 2] (k-pairs: AMX's layout), 16 rows per pass. Tile
// register 0 holds 16 rows x 32 k of x, 1 and 2 the weights' 16 k-pairs of columns 0-15 and 16-31,
// 3 and 4 the rows' 16 + 16 sums, accumulated over k in order whatever the number of rows. The first
// pass prefetches the weights kAmxAhead k-steps ahead, running on into the thread's next tile (`next`):
// with the hardware's prefetch alone, memory idled while the tile unit computed (products ~7% slower).
void AmxTile(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t kp, int64_t o_dim,
             const uint16_t* next) {
  constexpr int64_t kStep = kPairK * kTile * sizeof(uint16_t);  // weight bytes per k-step
  const int64_t tile = kp * kTile * sizeof(uint16_t);
  const char *here = reinterpret_cast<const char*>(w), *then = reinterpret_cast<const char*>(next);
  for (int64_t p = 0; p < m; p += kAmxRows) {
    TileConfig cfg;
    for (int t = 0; t < 5; ++t) cfg.colsb[t] = 64;
    cfg.rows[0] = cfg.rows[3] = cfg.rows[4] = static_cast<uint8_t>(std::min(kAmxRows, m - p));
    cfg.rows[1] = cfg.rows[2] = kPairK / 2;
    _tile_loadconfig(&cfg);
    _tile_zero(3);
    _tile_zero(4);
    for (int64_t k = 0; k < kp; k += kPairK) {
      const int64_t ahead = k / kPairK * kStep + kAmxAhead * kStep;  // within this tile, then the next one's
      const char* fetch = p > 0 ? nullptr : ahead < tile ? here + ahead : then ? then + ahead - tile : nullptr;
      for (int64_t b = 0; fetch != nullptr && b < kStep; b += kLine) __builtin_prefetch(fetch + b);
      _tile_loadd(0, x + p * kp + k, kp * sizeof(uint16_t));
      _tile_loadd(1, w + k * kTile, 2 * kTile * sizeof(uint16_t));
      _tile_loadd(2, w + k * kTile + kTile, 2 * kTile * sizeof(uint16_t));
      _tile_dpbf16ps(3, 0, 1);
      _tile_dpbf16ps(4, 0, 2);
    }
    _tile_stored(3, y + p * o_dim, o_dim * sizeof(float));
    _tile_stored(4, y + p * o_dim + kTile / 2, o_dim * sizeof(float));
  }
  _tile_release();
}

#endif

#if defined(REDRAFTER_AMX) || defined(__AVX512BF16__)
// Products of x with weights in the k-pairs layout [O / 32, Kp / 2, 64]: x rounded to bfloat16 and
// zero-padded to Kp, then every tile by `kAmx` (AMX's tile unit) or else AVX512-BF16's dot products.
template <bool kAmx>
ffi::Error RowsMatmulPairs(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                           ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[3] != 2 * kTile || wd[2] % (kPairK / 2) || 2 * wd[2] < xd[1] ||
      2 * wd[2] >= xd[1] + kPairK) {
    return ffi::Error::InvalidArgument("rows_matmul (k-pairs): expects x [M, K] and w [G, O / 32, Kp / 2, 64], Kp "
                                       "= K up to 32s");
  }
  const int64_t m = xd[0], k_dim = xd[1], kp = 2 * wd[2], tiles = wd[1], o_dim = tiles * kTile;
  std::vector<uint16_t> xb(m * kp, 0);  // x in bfloat16, zero-padded to Kp
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t k = 0; k < k_dim; ++k) xb[r * kp + k] = ToBfloat16(x.typed_data()[r * k_dim + k]);
  }
  const uint16_t* xp = xb.data();
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();
  const int64_t size = kp * kTile;  // one tile's weights
  return ForEachTile(pool, sizes, m, wd[0], tiles, [=](int64_t tile, int64_t t, int64_t row0, int64_t rows,
                                                       int64_t after) {
    const uint16_t *here = wp + tile * size, *next = after < 0 ? nullptr : wp + after * size;
    const uint16_t* xr = xp + row0 * kp;
    float* yr = yp + row0 * o_dim + t * kTile;
#ifdef REDRAFTER_AMX
    if constexpr (kAmx) AmxTile(xr, here, yr, rows, kp, o_dim, next);
#endif
#ifdef __AVX512BF16__
    if constexpr (!kAmx) {  // a k-pair of x or of a weight column is one 32-bit word
      using Pair = const uint32_t*;
      Tile(reinterpret_cast<Pair>(xr), reinterpret_cast<Pair>(here), yr, rows, kp / 2, o_dim,
           reinterpret_cast<Pair>(next));
    }
#endif
  });
}
#endif

// MXFP4 weights (mxfp4.py) as tiles: codes [O / 32, K / 32, 32, 16] (per 32-column tile, input block
// and k, byte j holds column j's 4-bit code in its low half and column j + 16's in its high half) and
// scales [O / 32, K / 32, 32] (each column's power of two for the block, biased by 127), 17 bytes per k
// of a tile where float32 takes 128. Each weight is decoded as E2M1's value times its scale, exactly
// the float32 `Mxfp4.dequantize` gives, and summed in the same chain of fused multiply-adds, so the
// products are bitwise those of the float32 kernel on the dequantized weights. kE2M1: mxfp4.py's E2M1.
alignas(64) constexpr float kE2M1[16] = {0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6};

// kLanes codes -> their E2M1 values: a lookup with AVX-512, else E2M1's bits placed as float32's.
inline Vec E2M1(const Word& code) {
#ifdef __AVX512F__
  return reinterpret_cast<Vec>(_mm512_permutexvar_ps(reinterpret_cast<__m512i>(code), _mm512_load_ps(kE2M1)));
#else
  const Word m = code & 7, normal = (((m >> 1) + 126) << 23) | ((m & 1) << 22);  // 1.m x 2^(e - 1)
  return reinterpret_cast<Vec>((m < 2 ? m * (126u << 23) : normal) | ((code >> 3) << 31));  // 0 and 0.5: subnormal
#endif
}

// kLanes biased exponents -> their powers of two as float32 (0 -> 0, as XLA flushes 2^-127).
inline Vec PowersOfTwo(const uint8_t* scales) {
  return reinterpret_cast<Vec>(__builtin_convertvector(*reinterpret_cast<const Bytes*>(scales), Word) << 23);
}

// One pass of R rows over the slice of a tile at column kCol (codes, scales: the tile's).
template <int R, int64_t kCol>
void Mxfp4Pass(const float* x, const uint8_t* codes, const uint8_t* scales, float* y, int64_t k_dim, int64_t o_dim) {
  Vec acc[R][kVecs] = {};
  for (int64_t b = 0; b < k_dim / kMxfp4Block; ++b) {
    Vec s[kVecs];
    for (int i = 0; i < kVecs; ++i) s[i] = PowersOfTwo(scales + b * kTile + kCol + i * kLanes);
    for (int64_t k = b * kMxfp4Block; k < (b + 1) * kMxfp4Block; ++k) {
      Vec wv[kVecs];
      for (int i = 0; i < kVecs; ++i) {  // columns 0-15: the bytes' low halves, 16-31: their high halves
        const int64_t c = kCol + i * kLanes;
        const uint8_t half = c < 16 ? 0x0f : 0xf0;  // shifted after widening: AVX2 has no byte shifts
        const Bytes code = *reinterpret_cast<const Bytes*>(codes + k * 16 + c % 16) & half;
        wv[i] = E2M1(__builtin_convertvector(code, Word) >> (c < 16 ? 0 : 4)) * s[i];
      }
      for (int r = 0; r < R; ++r) Madd(acc[r], x[r * k_dim + k], wv);
    }
  }
  Store(acc, y + kCol, o_dim);
}

// The passes by slice and rows: kMxfp4Passes[slice][R - 1].
using Mxfp4PassFn = void (*)(const float*, const uint8_t*, const uint8_t*, float*, int64_t, int64_t);
using Mxfp4SliceFns = std::array<Mxfp4PassFn, kRows>;
template <int64_t kCol, int64_t... R>
constexpr Mxfp4SliceFns Mxfp4SlicePasses(std::integer_sequence<int64_t, R...>) {
  return {Mxfp4Pass<R + 1, kCol>...};
}
template <int64_t... S>
constexpr auto Mxfp4Passes(std::integer_sequence<int64_t, S...>) {
  // The type spelled out: deduced from one slice (AVX-512's), std::array{slice} is that slice's copy, and
  // pass[R - 1] then offset a function pointer (a GCC extension) and jumped into the middle of a pass.
  return std::array<Mxfp4SliceFns, sizeof...(S)>{
      Mxfp4SlicePasses<S * kSlice>(std::make_integer_sequence<int64_t, kRows>{})...};
}
constexpr auto kMxfp4Passes = Mxfp4Passes(std::make_integer_sequence<int64_t, kTile / kSlice>{});
static_assert(kMxfp4Passes.size() == kTile / kSlice);

ffi::Error RowsMatmulMxfp4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                           ffi::Buffer<ffi::U8> scales, ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), cd = codes.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || cd.size() != 5 || sd.size() != 4 || cd[2] * kMxfp4Block != xd[1] || cd[3] != kMxfp4Block ||
      cd[4] != 16 || !std::equal(sd.begin(), sd.end(), cd.begin()) || xd[1] % kMxfp4Block) {
    return ffi::Error::InvalidArgument("rows_matmul (MXFP4): expects x [M, K] and codes [G, O / 32, K / 32, 32, 16] "
                                       "with scales [G, O / 32, K / 32, 32]");
  }
  const int64_t m = xd[0], k_dim = xd[1], tiles = cd[1], o_dim = tiles * kTile;
  const float* xp = x.typed_data();
  const uint8_t *cp = codes.typed_data(), *sp = scales.typed_data();
  float* yp = y->typed_data();
  return ForEachTile(pool, sizes, m, cd[0], tiles, [=](int64_t tile, int64_t t, int64_t row0, int64_t rows, int64_t) {
    for (const auto& pass : kMxfp4Passes) {
      for (int64_t p = 0; p < rows; p += kRows) {
        pass[std::min(kRows, rows - p) - 1](xp + (row0 + p) * k_dim, cp + tile * k_dim * 16, sp + tile * k_dim,
                                            yp + (row0 + p) * o_dim + t * kTile, k_dim, o_dim);
      }
    }
  });
}

// MXFP4 blocks [..., O, K / 32, 16] and scales [..., O, K / 32] (mxfp4.py's, inputs last) -> the tiles above,
// leading axes groups; columns past O get code 0 (a zero weight).
ffi::Error PackMxfp4(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> blocks, ffi::Buffer<ffi::U8> scales,
                     ffi::ResultBuffer<ffi::U8> codes, ffi::ResultBuffer<ffi::U8> tile_scales) {
  auto bd = blocks.dimensions(), sd = scales.dimensions(), cd = codes->dimensions();
  const size_t lead = sd.size() - 2;
  const bool shaped = sd.size() >= 2 && bd.size() == sd.size() + 1 && bd.back() == 16 && cd.size() == lead + 4 &&
                      std::equal(sd.begin(), sd.end(), bd.begin()) &&
                      std::equal(sd.begin(), sd.begin() + lead, cd.begin());
  if (!shaped || cd[lead] != (sd[lead] + kTile - 1) / kTile || cd[lead + 1] != sd[lead + 1]) {
    return ffi::Error::InvalidArgument("pack_mxfp4: expects blocks [..., O, K / 32, 16], scales [..., O, K / 32] and "
                                       "codes [..., ceil(O / 32), K / 32, 32, 16]");
  }
  int64_t groups = 1;
  for (size_t i = 0; i < lead; ++i) groups *= sd[i];
  const int64_t o_dim = sd[lead], n_blocks = sd[lead + 1], tiles = cd[lead];
  ParallelFor(pool, groups * tiles, [=, bp = blocks.typed_data(), sp = scales.typed_data(), cp = codes->typed_data(),
                                     tp = tile_scales->typed_data()](int64_t task, int64_t) {
    const int64_t g = task / tiles, t = task % tiles;
    for (int64_t b = 0; b < n_blocks; ++b) {
      uint8_t* out = cp + (task * n_blocks + b) * kMxfp4Block * 16;
      uint8_t* scale = tp + (task * n_blocks + b) * kTile;
      for (int64_t j = 0; j < kTile; ++j) {
        const int64_t col = t * kTile + j;
        const uint8_t* in = bp + ((g * o_dim + col) * n_blocks + b) * 16;
        scale[j] = col < o_dim ? sp[(g * o_dim + col) * n_blocks + b] : 127;
        for (int64_t k = 0; k < kMxfp4Block; ++k) {
          const uint8_t code = col < o_dim ? (in[k / 2] >> (4 * (k % 2))) & 15 : 0;
          if (j < 16) out[k * 16 + j] = code;
          else out[k * 16 + j - 16] |= code << 4;
        }
      }
    }
  });
  return ffi::Error::Success();
}

// w [K, O] (or, transposed, w [O, K]: an embedding used as the LM head) -> tiles [ceil(O / 32), K, 32],
// the last tile zero-padded; with `pairs`, AMX's layout [ceil(O / 32), Kp / 2, 32, 2] (k-pairs, K
// zero-padded to Kp, a multiple of 32: whole tile products). Leading axes are groups, packed one by one
// (a mixture's experts: w [G, K, O] -> tiles [G, ceil(O / 32), K, 32]). XLA:CPU's own transposes took
// ~0.6 s for the default model's weights on 2 cores, a cost every generate() call paid. Blocks of 16
// tiles x 64 rows keep both the strided reads and the writes within a few pages.
template <ffi::DataType T>
ffi::Error PackTiles(ffi::ThreadPool pool, ffi::Buffer<T> w, ffi::ResultBuffer<T> tiles, bool transposed, bool pairs) {
  auto wd = w.dimensions(), td = tiles->dimensions();
  const size_t lead = wd.size() - 2;  // group axes
  const bool shaped = wd.size() >= 2 && td.size() == lead + 3 && (!transposed || lead == 0) &&
                      std::equal(wd.begin(), wd.begin() + lead, td.begin());
  const int64_t k_dim = shaped ? wd[lead + (transposed ? 1 : 0)] : 0;
  const int64_t o_dim = shaped ? wd[lead + (transposed ? 0 : 1)] : 0;
  const int64_t rows = pairs ? (k_dim + kPairK - 1) / kPairK * kPairK : k_dim;
  const int64_t step = pairs ? 2 : 1;  // a column's next weight: beside it, or in the next row
  if (!shaped || td[lead] != (o_dim + kTile - 1) / kTile || td[lead + 1] * td[lead + 2] != rows * kTile ||
      td[lead + 2] != (pairs ? 2 : 1) * kTile) {
    return ffi::Error::InvalidArgument("pack_tiles: expects w [..., K, O] (transposed: [O, K]) and tiles [..., "
                                       "ceil(O / 32), K, 32] (pairs: [..., ceil(O / 32), Kp / 2, 64])");
  }
  constexpr int64_t kBlockTiles = 16, kBlockRows = 64;
  int64_t groups = 1;
  for (size_t i = 0; i < lead; ++i) groups *= wd[i];
  const int64_t n_tiles = td[lead], blocks = (n_tiles + kBlockTiles - 1) / kBlockTiles;
  ParallelFor(pool, groups * blocks, [=, wp = w.typed_data(), tp = tiles->typed_data()](int64_t task, int64_t) {
    const int64_t g = task / blocks, b = task % blocks, t_end = std::min(n_tiles, (b + 1) * kBlockTiles);
    const auto* wg = wp + g * k_dim * o_dim;
    auto* tg = tp + g * n_tiles * rows * kTile;
    for (int64_t k0 = 0; k0 < rows; k0 += kBlockRows) {
      const int64_t k_end = std::min(rows, k0 + kBlockRows);
      for (int64_t t = b * kBlockTiles; t < t_end; ++t) {
        const int64_t col = t * kTile, width = std::min(kTile, o_dim - col);
        for (int64_t k = k0; k < k_end; ++k) {
          auto* out = tg + t * rows * kTile + (pairs ? (k & ~int64_t{1}) * kTile + (k & 1) : k * kTile);
          for (int64_t c = 0; c < kTile; ++c) {
            out[c * step] = k < k_dim && c < width ? (transposed ? wg[(col + c) * k_dim + k] : wg[k * o_dim + col + c])
                                                   : std::remove_reference_t<decltype(out[0])>{};
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// One handler per weight dtype (x and y are float32 in both).
#define ROWS_MATMUL(name, T)                                                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, RowsMatmul<T>,                                             \
                                ffi::Ffi::Bind()                                                 \
                                    .Ctx<ffi::ThreadPool>()                                      \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                \
                                    .Arg<ffi::Buffer<T>>()                                       \
                                    .Arg<ffi::Buffer<ffi::S32>>()                                \
                                    .Ret<ffi::Buffer<ffi::F32>>())
#define PACK_TILES(name, T)                                                                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, PackTiles<T>,                                              \
                                ffi::Ffi::Bind()                                                 \
                                    .Ctx<ffi::ThreadPool>()                                      \
                                    .Arg<ffi::Buffer<T>>()                                       \
                                    .Ret<ffi::Buffer<T>>()                                       \
                                    .Attr<bool>("transposed")                                    \
                                    .Attr<bool>("pairs"))

XLA_FFI_DEFINE_HANDLER_SYMBOL(redrafter_rows_matmul_mxfp4, RowsMatmulMxfp4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(redrafter_pack_mxfp4, PackMxfp4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::U8>>());
ROWS_MATMUL(redrafter_rows_matmul, ffi::F32);
ROWS_MATMUL(redrafter_rows_matmul_bf16, ffi::BF16);
PACK_TILES(redrafter_pack_tiles, ffi::F32);
PACK_TILES(redrafter_pack_tiles_bf16, ffi::BF16);

// Floats per vector register of the unit this library was built for (csrc/simd.h).
extern "C" int64_t redrafter_vector_lanes() { return kLanes; }

// Whether this library has the AMX kernel and the process may use AMX's tile registers (Linux asks
// each process to request them once).
extern "C" int redrafter_amx_ready() {
#ifdef REDRAFTER_AMX
  constexpr int kReqXcompPerm = 0x1023, kXfeatureTileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
#else
  return 0;
#endif
}

// The k-pairs kernels, each where the compiler targets its unit.
#define ROWS_MATMUL_PAIRS(name, amx)                                                             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, RowsMatmulPairs<amx>,                                      \
                                ffi::Ffi::Bind()                                                 \
                                    .Ctx<ffi::ThreadPool>()                                      \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                \
                                    .Arg<ffi::Buffer<ffi::BF16>>()                               \
                                    .Arg<ffi::Buffer<ffi::S32>>()                                \
                                    .Ret<ffi::Buffer<ffi::F32>>())
#ifdef REDRAFTER_AMX
ROWS_MATMUL_PAIRS(redrafter_rows_matmul_amx, true);
#endif
#ifdef __AVX512BF16__
ROWS_MATMUL_PAIRS(redrafter_rows_matmul_dpbf16, false);
#endif
