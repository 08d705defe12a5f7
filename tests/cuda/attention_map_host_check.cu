// Runs the arithmetic of the CUDA attention-map kernels (column_unit_sum, column_factor, unit_grad of
// csrc/include/distillx/cuda/attention_map.cuh) on the CPU, for float with the CPU's flush-to-zero
// and denormals-are-zero on, as the build's --use_fast_math has every float operation on the GPU
// (double is not flushed there, so it runs without). Each sample's map, scale and gradient are
// compared with a double computation made before flushing was turned on. Exit status 0 and "ok" when
// every check holds; test_nvcc_compile.py builds and runs it (no GPU needed).
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define DISTILLX_HAVE_FTZ 1
#endif

#include "distillx/cuda/attention_map.cuh"

namespace dc = distillx::cuda;

static int failures = 0;

static void check(bool ok, const char* what, const char* sample, double p, long i, double got, double want) {
  if (!ok && failures++ < 20) std::printf("FAIL %s %s p=%g [%ld]: got %.9g want %.9g\n", what, sample, p, i, got, want);
}

static bool near(double got, double want, double rtol, double atol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

static void set_flush(bool on) {
#ifdef DISTILLX_HAVE_FTZ
  _mm_setcsr(on ? (_mm_getcsr() | 0x8040u) : (_mm_getcsr() & ~0x8040u));  // FTZ | DAZ
#else
  (void)on;
#endif
}

// One (C, S) sample of magnitude `scale` (entries in (-1, 1] · scale, every fifth 0, one entry exactly
// ±scale), or with a NaN / an inf planted at entry 3.
template <typename T>
static std::vector<T> sample(int C, int S, double scale, int seed, double plant = 0) {
  std::vector<T> f(C * S);
  unsigned x = 12345u + seed;
  for (int i = 0; i < C * S; ++i) {
    x = x * 1664525u + 1013904223u;
    const double u = (static_cast<double>(x >> 8) / (1u << 24)) * 2 - 1;
    f[i] = i % 5 == 4 ? T(0) : static_cast<T>(u * scale);
  }
  f[C * S / 2] = static_cast<T>(-scale);
  if (plant != 0) f[3] = static_cast<T>(plant);
  return f;
}

template <typename T>
static void run(const char* name, const std::vector<T>& f, int C, int S, double p, bool flush) {
  using Key = typename dc::KeyOf<T>::type;
  // Expected, in double on the exact values, before flushing is on.
  set_flush(false);
  double m = 0;
  for (T v : f) m = (std::isnan(static_cast<double>(v)) || std::fabs(static_cast<double>(v)) > m) ? std::fabs(double(v)) : m;
  std::vector<double> want_map(S, 0.0), want_grad(C * S), g(S);
  for (int s = 0; s < S; ++s) {
    g[s] = 1e-3 * ((s % 7) - 3.0) + 2e-4;
    for (int c = 0; c < C; ++c) want_map[s] += std::pow(std::fabs(double(f[c * S + s]) / m), p) / C;
  }
  for (int i = 0; i < C * S; ++i) {
    const double v = double(f[i]) / m, q = p == 2 ? 1.0 : p - 1;
    // NaN where f / m is (an inf entry of an inf sample: pow(NaN, 0) would be 1), as the reference has it
    const double d = v == 0 ? 0.0 : (std::isnan(v) ? v : std::copysign(std::pow(std::fabs(v), q), v));
    want_grad[i] = double(static_cast<T>(d * g[i % S] * p / C / m));  // rounded to T: inf beyond its range
  }
  // The kernels' arithmetic, flushed as on the GPU.
  set_flush(flush);
  std::vector<T> sums(S);
  std::vector<Key> keys(S);
  Key mb = 0;
  for (int s = 0; s < S; ++s) {
    dc::column_unit_sum(f.data() + s, C, S, T(p), sums[s], keys[s]);
    mb = keys[s] > mb ? keys[s] : mb;
  }
  const dc::UnitScale<T> unit(mb);
  std::vector<T> map(S), grad(C * S);
  for (int s = 0; s < S; ++s) map[s] = sums[s] * dc::column_factor(keys[s], mb, unit, T(p), T(1) / T(C));
  const T q = p == 2 ? T(1) : T(p - 1);
  for (int i = 0; i < C * S; ++i) grad[i] = dc::unit_grad(f[i], T(g[i % S]), unit, q, T(p / C));
  set_flush(false);
  const double tol = sizeof(T) == 4 ? 2e-5 : 1e-12;
  const double mb_value = double(dc::from_key(mb));
  check(mb_value == m || (std::isnan(m) && std::isnan(mb_value)), "scale", name, p, -1, mb_value, m);
  for (int s = 0; s < S; ++s) check(near(map[s], want_map[s], tol, tol), "map", name, p, s, map[s], want_map[s]);
  double gmax = 0;
  for (double w : want_grad) gmax = std::isfinite(w) ? std::fmax(gmax, std::fabs(w)) : gmax;
  // A gradient below T's normal range is flushed to 0 under flush-to-zero (as on the GPU).
  const double floor = flush ? double(std::numeric_limits<T>::min()) : 0.0;
  for (int i = 0; i < C * S; ++i)
    check(near(grad[i], want_grad[i], 10 * tol, std::fmax(tol * gmax, floor)), "grad", name, p, i, grad[i],
          want_grad[i]);
}

int main() {
  const int C = 5, S = 13;
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (double p : {2.0, 1.0, 1.5, 0.5, 3.0}) {
    run<float>("f32 subnormal 1e-39", sample<float>(C, S, 1e-39, 1), C, S, p, true);
    run<float>("f32 subnormal 1e-43", sample<float>(C, S, 1e-43, 2), C, S, p, true);
    run<float>("f32 min normal", sample<float>(C, S, 1.5e-38, 3), C, S, p, true);
    run<float>("f32 ordinary", sample<float>(C, S, 3.0, 4), C, S, p, true);
    run<float>("f32 above 2^126", sample<float>(C, S, 3e38, 5), C, S, p, true);
    run<float>("f32 NaN", sample<float>(C, S, 1e-39, 6, nan), C, S, p, true);
    run<float>("f32 inf", sample<float>(C, S, 1e-39, 7, inf), C, S, p, true);
    run<double>("f64 subnormal 1e-309", sample<double>(C, S, 1e-309, 8), C, S, p, false);
    run<double>("f64 ordinary", sample<double>(C, S, 3.0, 9), C, S, p, false);
  }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
