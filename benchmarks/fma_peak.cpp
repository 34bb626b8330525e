// The arithmetic peak of this CPU: threads that do nothing but independent fused multiply-adds on
// registers, the ceiling no attention kernel can pass (torch.mm is not that ceiling: on AMD it
// takes a slower MKL path). Built and run by benchmarks/peak.py:
//
//     g++ -O2 -ffp-contract=fast -march=native -pthread benchmarks/fma_peak.cpp -o fma_peak
//     ./fma_peak 2        # (-mcpu=native instead of -march=native on aarch64)
//
// prints "fp32 <GFLOP/s>" and "bf16 <GFLOP/s>" for that many threads. fp32: fused multiply-adds on
// the widest vectors the compiler targets (AVX-512, AVX2, else 4-lane GCC vectors), 2 FLOPs per
// lane. bf16: vdpbf16ps where the CPU has it (AVX512_BF16: 2 products per fp32 lane, 4 FLOPs per
// lane); without it the bf16 kernels convert to fp32 and the fp32 rate is their ceiling, printed
// as such.
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

constexpr long kIters = 50'000'000;

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16, kAcc = 24;  // independent chains: covers 2 pipes x 4-cycle latency
inline Vec splat(float x) { return _mm512_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float lane0(Vec v) { return _mm512_cvtss_f32(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kLanes = 8, kAcc = 12;
inline Vec splat(float x) { return _mm256_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float lane0(Vec v) { return _mm256_cvtss_f32(v); }
#else  // other CPUs (aarch64: NEON's 4 lanes): GCC vectors, contracted to fused multiply-adds
using Vec = float __attribute__((vector_size(16)));
constexpr int kLanes = 4, kAcc = 16;
inline Vec splat(float x) { return Vec{x, x, x, x}; }
inline Vec fma(Vec a, Vec b, Vec c) { return a * b + c; }
inline float lane0(Vec v) { return v[0]; }
#endif

// FLOPs done; the sum goes to *sink so the loop is not removed.
double fp32_loop(float* sink) {
  Vec acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = splat(float(i));
  const Vec a = splat(0.999999f), b = splat(1e-7f);
  for (long it = 0; it < kIters; ++it)
#pragma GCC unroll 24
    for (int i = 0; i < kAcc; ++i) acc[i] = fma(acc[i], a, b);
  float sum = 0;
  for (int i = 0; i < kAcc; ++i) sum += lane0(acc[i]);
  *sink = sum;
  return double(kIters) * kAcc * kLanes * 2;
}

#if defined(__AVX512BF16__)
double bf16_loop(float* sink) {
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
  for (long it = 0; it < kIters; ++it)
#pragma GCC unroll 24
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, a);
  float sum = 0;
  for (int i = 0; i < kAcc; ++i) sum += _mm512_cvtss_f32(acc[i]);
  *sink = sum;
  return double(kIters) * kAcc * 16 * 4;
}
#endif

// GFLOP/s of `loop` run by `threads` threads at once.
double rate(double (*loop)(float*), int threads) {
  std::vector<float> sinks(threads);
  std::vector<double> flops(threads);
  std::vector<std::thread> pool;
  const auto start = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { flops[t] = loop(&sinks[t]); });
  for (std::thread& th : pool) th.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  double total = 0;
  for (int t = 0; t < threads; ++t) total += flops[t] + (sinks[t] == -1.0f ? 1 : 0);
  return total / seconds / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  double fp32 = 0;
  for (int round = 0; round < 3; ++round) fp32 = std::max(fp32, rate(fp32_loop, threads));
  std::printf("fp32 %.1f\n", fp32);
#if defined(__AVX512BF16__)
  double bf16 = 0;
  for (int round = 0; round < 3; ++round) bf16 = std::max(bf16, rate(bf16_loop, threads));
  std::printf("bf16 %.1f\n", bf16);
#else
  std::printf("bf16 %.1f\n", fp32);  // no bf16 dot product: bf16 is converted, fp32 is the ceiling
#endif
  return 0;
}
