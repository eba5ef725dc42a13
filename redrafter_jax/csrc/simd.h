// What the CPU kernels share about the vector unit they are compiled for (-march=native): a vector
// type as wide as its registers, and how many registers it has. A GCC vector wider than the registers
// has no machine mode and lives in memory, every operation a load and a store: with AVX-512's 16-float
// vectors on an AVX2 CPU (AMD Zen 3) the matmul ran 8-20x slower than XLA's and a decode step 2.6x.
#pragma once

#include <cstdint>

namespace redrafter {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16, kRegisters = 32;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8, kRegisters = 16;
#elif defined(__aarch64__)
constexpr int64_t kLanes = 4, kRegisters = 32;  // NEON
#else
constexpr int64_t kLanes = 4, kRegisters = 16;  // SSE
#endif
// Sums a kernel may keep in registers: three quarters of them, the rest for operands.
constexpr int64_t kAccumulators = kRegisters * 3 / 4;

typedef float Vec __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef int32_t IVec __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef uint32_t Word __attribute__((vector_size(4 * kLanes), aligned(4)));  // float32s' bits
typedef uint16_t Half __attribute__((vector_size(2 * kLanes), aligned(2)));  // bfloat16s
typedef uint8_t Bytes __attribute__((vector_size(kLanes), aligned(1)));

}  // namespace redrafter
