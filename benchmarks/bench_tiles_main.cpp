// The matrix products of the CPU kernels alone, one thread (benchmarks/bench_tiles.py builds and
// runs it). Each product is csrc/cpu's gemm at the shape, strides and operand layout that flash_fwd
// and flash_bwd call it with (their block sizes, from flash_impl.h), timed twice: with its right
// operand B hot (the same packed block every call, so it sits in L1/L2) and cold (the next block of
// a pool larger than L2 at every call, as a forward task meets each key block of a long sequence).
// A kernel's % of the peak next to these products' says what its other work costs.
//
// RING_EXT_BENCH_KERNELS names one level's kernels_<isa>.cpp: including it brings that level's
// target pragma, which stays on for the rest of this file, and its namespace.
#include RING_EXT_BENCH_KERNELS

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace kern = ring_ext::cpu::RING_EXT_CPU_ISA;

namespace {

using Clock = std::chrono::steady_clock;

// One product C [m, n] (+)= A B over k steps, as the kernels call gemm (Note [AVX-512
// micro-kernel]): A(i, kk) at a[i * sm + kk * sk], B's step kk at b[kk * ldb].
struct Product {
  std::string name;
  int64_t m, n, k, sm, sk, ldb;
  bool accumulate;
};

// The products of one forward task's key block and one backward (query block, key block) pair at
// head dim d (q, k and v alike), with T's k step (1 float, or a bf16 pair).
template <typename T>
std::vector<Product> products(int64_t d) {
  constexpr int64_t step = kern::kStep<T>;
  const int64_t dpad = kern::round_up(d, 16), fk = kern::kFwdBlockK, bq = kern::kBwdBlockQ;
  const int64_t bk = kern::kBlockK, d_steps = kern::ceil_div(d, step);
  return {
      {"fwd S = Q K^T", kern::kBlockQ, fk, d_steps, dpad, step, kern::padded(fk) * step, false},
      {"fwd O += P V", kern::kBlockQ, dpad, fk / step, fk, step, kern::padded(dpad) * step, true},
      {"bwd S = Q K^T, dP = dO V^T", bq, bk, d_steps, kern::padded(dpad), step,
       kern::padded(bk) * step, false},
      // P^T and dS^T: float32 tiles read transposed; bf16 as row pairs (bwd_operands)
      {"bwd dV += P^T dO, dK += dS^T Q", bk, dpad, bq / step, step == 1 ? 1 : 2,
       step == 1 ? bk : 2 * bk, kern::padded(dpad) * step, true},
      {"bwd dQ += dS K", bq, dpad, bk / step, bk, step, kern::padded(dpad) * step, true},
  };
}

template <typename T>
T random_value(std::mt19937_64& rng) {
  const float x = std::normal_distribution<float>(0.0f, 1.0f)(rng);
  if constexpr (sizeof(T) == 4)
    return x;
  else
    return ring_ext::cpu::float_to_bf16(x);
}

template <typename T>
double to_double(T x) {
  if constexpr (sizeof(T) == 4)
    return x;
  else
    return ring_ext::cpu::bf16_to_float(x);
}

// max |gemm - sum| / max |sum| of C = A B computed by gemm and by a plain sum over the same strides
// (a bf16 step is the pair of elements at a[i * sm + kk * sk] and b[kk * ldb + 2 j]): the strides
// describe a real product, so the times are of one.
template <typename T>
double check(const Product& pr, const T* a, const T* b) {
  constexpr int64_t step = kern::kStep<T>;
  std::vector<float> c(pr.m * pr.n);
  kern::gemm(a, pr.sm, pr.sk, b, pr.ldb, pr.m, pr.n, pr.k, c.data(), pr.n, false);
  double err = 0.0, top = 0.0;
  for (int64_t i = 0; i < pr.m; ++i)
    for (int64_t j = 0; j < pr.n; ++j) {
      double sum = 0.0;
      for (int64_t kk = 0; kk < pr.k; ++kk)
        for (int64_t e = 0; e < step; ++e)
          sum +=
              to_double(a[i * pr.sm + kk * pr.sk + e]) * to_double(b[kk * pr.ldb + j * step + e]);
      err = std::max(err, std::abs(c[i * pr.n + j] - sum));
      top = std::max(top, std::abs(sum));
    }
  return err / top;
}

// One product's operands: A, C and a pool of B blocks, the first of which is the hot one.
template <typename T>
struct Operands {
  Product pr;
  int64_t block, blocks;  // elements per B block (a multiple of 64: aligned), blocks in the pool
  kern::TileVec<T> a, b;
  kern::TileVec<float> c;
  int64_t next = 0;         // the cold run's next block
  double best[2] = {0, 0};  // GFLOP/s, hot and cold

  Operands(const Product& product, int64_t cold_bytes, std::mt19937_64& rng)
      : pr(product),
        block(kern::round_up(pr.k * pr.ldb, 64)),
        blocks(std::max<int64_t>(2, cold_bytes / int64_t(block * sizeof(T)))),
        a((pr.m - 1) * pr.sm + (pr.k - 1) * pr.sk + kern::kStep<T>),
        b(block * blocks),
        c(pr.m * pr.n, 0.0f) {
    for (T& x : a) x = random_value<T>(rng);
    for (T& x : b) x = random_value<T>(rng);
  }

  // Calls gemm for at least `seconds`, on the hot block or each time the next one, and keeps the
  // best GFLOP/s.
  void time(bool cold, double seconds) {
    int64_t calls = 0;
    const Clock::time_point start = Clock::now();
    double elapsed = 0.0;
    for (; elapsed < seconds;
         elapsed = std::chrono::duration<double>(Clock::now() - start).count()) {
      for (int i = 0; i < 16; ++i, ++calls) {
        const T* bk = b.data() + (cold ? next : 0) * block;
        if (cold) next = (next + 1) % blocks;
        kern::gemm(a.data(), pr.sm, pr.sk, bk, pr.ldb, pr.m, pr.n, pr.k, c.data(), pr.n,
                   pr.accumulate);
      }
    }
    const double flops = 2.0 * pr.m * pr.n * pr.k * kern::kStep<T> * calls;
    best[cold] = std::max(best[cold], flops / elapsed / 1e9);
  }
};

// One tab-separated line per product: dtype, d, name, m, n, k, hot GFLOP/s, cold GFLOP/s (each the
// best of `rounds` runs of at least `seconds`; a round runs every product, hot then cold, so that a
// slow phase of a shared machine does not fall on all of one product's runs), and check()'s error.
template <typename T>
void run(const char* dtype, int64_t d, int64_t cold_bytes, double seconds, int rounds) {
  std::mt19937_64 rng(0);
  std::vector<std::unique_ptr<Operands<T>>> all;
  for (const Product& pr : products<T>(d))
    all.push_back(std::make_unique<Operands<T>>(pr, cold_bytes, rng));
  for (int round = 0; round < rounds; ++round)
    for (auto& op : all) {
      op->time(false, seconds);
      op->time(true, seconds);
    }
  for (auto& op : all) {
    const Product& pr = op->pr;
    std::printf("%s\t%lld\t%s\t%lld\t%lld\t%lld\t%.1f\t%.1f\t%.2g\n", dtype, (long long)d,
                pr.name.c_str(), (long long)pr.m, (long long)pr.n,
                (long long)(pr.k * kern::kStep<T>), op->best[0], op->best[1],
                check(pr, op->a.data(), op->b.data()));
  }
  std::fflush(stdout);
}

// The bf16-pair products where this level has them (a template, so that the other levels never
// instantiate them).
template <bool kPairs = kern::kHasBf16Dot>
void run_pairs(int64_t d, int64_t cold_bytes, double seconds, int rounds) {
  if constexpr (kPairs) run<uint16_t>("bf16", d, cold_bytes, seconds, rounds);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: bench_tiles COLD_BYTES SECONDS_PER_RUN ROUNDS D...\n");
    return 2;
  }
  const int64_t cold_bytes = std::atoll(argv[1]);
  const double seconds = std::atof(argv[2]);
  const int rounds = std::atoi(argv[3]);
  for (int i = 4; i < argc; ++i) {
    const int64_t d = std::atoll(argv[i]);
    run<float>("fp32", d, cold_bytes, seconds, rounds);
    run_pairs(d, cold_bytes, seconds, rounds);
  }
  return 0;
}
