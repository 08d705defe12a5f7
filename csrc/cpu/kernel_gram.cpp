// CPU kernel of the kernel-Gram family (distillx::kernel_gram): the panel loop and GEMMs are the
// device-agnostic code of include/distillx/kernel_gram.h; the elementwise part of a panel (both
// kernels, the difference, the loss and ∂loss/∂g) is one vectorised sweep here, in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "distillx/cpu/vec_math.h"
#include "distillx/kernel_gram.h"

namespace distillx {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// k and ∂k/∂g (and ∂k/∂g₁) of one side for a vector of g values.
template <typename T>
struct SideKernel {
  int64_t kernel;
  T p0, p1, p2;

  inline Vec<T> value(const Vec<T>& g, const Vec<T>& g1, const Vec<T>& nsum, Vec<T>* dk, Vec<T>* dk1) const {
    switch (kernel) {
      case kPolynomial: {
        const Vec<T> base = g * Vec<T>(p0) + Vec<T>(p1);
        const Vec<T> k = base.pow(Vec<T>(p2));
        if (dk) *dk = base.pow(Vec<T>(p2 - 1)) * Vec<T>(p2 * p0);
        return k;
      }
      case kRBF: {
        const Vec<T> d2 = at::vec::maximum(nsum - g - g, Vec<T>(0));
        const Vec<T> k = cpu::fast_exp(d2 * Vec<T>(-p0));
        if (dk) *dk = k * Vec<T>(2 * p0);
        return k;
      }
      case kChebyshev: {
        // (1 − g₁/D) + ε, in this order: 1 − g₁/D is exact-ish near 0, while rounding 1 + ε first
        // costs ~eps32/ε of relative error where u is smallest.
        const Vec<T> u = (Vec<T>(1) - g1 / Vec<T>(p0)) + Vec<T>(p1);
        const Vec<T> r = u.rsqrt();
        const Vec<T> k = g * r / Vec<T>(p0);
        if (dk) *dk = r / Vec<T>(p0);
        if (dk1) *dk1 = k / u * Vec<T>(T(0.5) / p0);
        return k;
      }
      default:
        if (dk) *dk = Vec<T>(1);
        return g;
    }
  }
};

template <typename T>
SideKernel<T> side(int64_t kernel, const std::vector<double>& p) {
  SideKernel<T> k{kernel, 0, 0, 0};
  if (p.size() > 0) k.p0 = static_cast<T>(p[0]);
  if (p.size() > 1) k.p1 = static_cast<T>(p[1]);
  if (p.size() > 2) k.p2 = static_cast<T>(p[2]);
  return k;
}

// The panel's buffers are cols-major (kPanelColsMajor): buffer row j holds the b entries (·, j) of
// column j, so the sweep runs down the columns with the panel rows i in the vector lanes; a column's
// values (norm, weight, coefficients) are broadcasts. Columns are cut into fixed chunks of kChunk,
// each summing its own partial loss and row statistics, and the partials are added in chunk order,
// so these sums do not depend on the thread count.
template <typename T>
double panel_cpu_typed(PanelArgs& a) {
  TORCH_CHECK(a.layout == kPanelColsMajor, "distillx: the CPU kernel_gram panel expects cols-major buffers");
  const int64_t P = a.gs.size(0), B = a.gs.size(1), diag = a.diag;
  const SideKernel<T> ks = side<T>(a.kernel, a.ps), kt = side<T>(a.kernel, a.pt);
  const bool rbf = a.kernel == kRBF, cheb = a.kernel == kChebyshev, grad = a.grad;
  const bool stats = a.mode == kRowStats, normgrad = a.mode == kRowNormGrad;
  const bool mmd = a.ai.defined();
  T* gs = a.gs.data_ptr<T>();
  T* gt = mmd ? nullptr : a.gt.data_ptr<T>();
  T* g1s = cheb ? a.g1s.data_ptr<T>() : nullptr;
  const T* g1t = cheb && !mmd ? a.g1t.const_data_ptr<T>() : nullptr;
  const T* nsi = rbf ? a.nsi.const_data_ptr<T>() : nullptr;
  const T* nsp = rbf ? a.nsp.const_data_ptr<T>() : nullptr;
  const T* nti = rbf ? a.nti.const_data_ptr<T>() : nullptr;
  const T* ntp = rbf ? a.ntp.const_data_ptr<T>() : nullptr;
  const T* wi = mmd ? a.ai.const_data_ptr<T>() : nullptr;
  const T* wp = mmd ? a.ap.const_data_ptr<T>() : nullptr;
  // Row-normalised gradient: the panel rows' coefficients {γ, α} as two contiguous vectors for
  // vector loads; the columns' are read as scalars from the (cols, 2) rows.
  at::Tensor gamma_i, alpha_i;
  if (normgrad) gamma_i = a.ri.select(1, 0).contiguous(), alpha_i = a.ri.select(1, 1).contiguous();
  const T* gam = normgrad ? gamma_i.const_data_ptr<T>() : nullptr;
  const T* alp = normgrad ? alpha_i.const_data_ptr<T>() : nullptr;
  const T* coef_p = normgrad ? a.rp.const_data_ptr<T>() : nullptr;
  double* stats_p = stats ? a.rp.data_ptr<double>() : nullptr;
  constexpr int64_t V = Vec<T>::size();
  constexpr int64_t kChunk = 64;
  const int64_t nv = (B + V - 1) / V, chunks = (P + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0), row_stats(stats ? chunks * 3 * nv * V : 0, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    // Row statistics of this chunk, lanes = panel rows: {ss, tt, st} × nv vectors.
    std::vector<T> acc_rows(stats ? 3 * nv * V : 0);
    for (int64_t c = begin; c < end; ++c) {
      std::fill(acc_rows.begin(), acc_rows.end(), T(0));
      Vec<T> acc_diag(0), acc_off(0);
      for (int64_t j = c * kChunk, j_end = std::min(P, j + kChunk); j < j_end; ++j) {
        const bool off = j >= diag;
        T* cs = gs + j * B;
        T* ct = mmd ? nullptr : gt + j * B;
        T* c1s = cheb ? g1s + j * B : nullptr;
        const T* c1t = cheb && !mmd ? g1t + j * B : nullptr;
        const Vec<T> nsj(rbf ? nsp[j] : T(0)), ntj(rbf ? ntp[j] : T(0));
        Vec<T> col_ss(0), col_tt(0), col_st(0);
        for (int64_t v = 0; v < nv; ++v) {
          const int64_t i = v * V, count = std::min(V, B - i);
          // Lanes past `count` were loaded as 0 and must not count: zero them through a partial store.
          auto trim = [&](Vec<T> x) {
            if (count == V) return x;
            T lanes[V] = {};
            x.store(lanes, count);
            return Vec<T>::loadu(lanes);
          };
          const Vec<T> g = Vec<T>::loadu(cs + i, count);
          const Vec<T> g1 = cheb ? Vec<T>::loadu(c1s + i, count) : Vec<T>(0);
          const Vec<T> ns = rbf ? Vec<T>::loadu(nsi + i, count) + nsj : Vec<T>(0);
          Vec<T> dk, dk1, d;
          const Vec<T> k = ks.value(g, g1, ns, grad ? &dk : nullptr, grad && cheb ? &dk1 : nullptr);
          if (mmd) {
            // MMD: the "difference" is the weight a_i a_j, the summand a_i a_j k.
            d = Vec<T>::loadu(wi + i, count) * Vec<T>(wp[j]);
            const Vec<T> sq = trim(d * k);
            if (off) acc_off = acc_off + sq; else acc_diag = acc_diag + sq;
          } else {
            const Vec<T> h = Vec<T>::loadu(ct + i, count);
            const Vec<T> h1 = cheb ? Vec<T>::loadu(c1t + i, count) : Vec<T>(0);
            const Vec<T> nt = rbf ? Vec<T>::loadu(nti + i, count) + ntj : Vec<T>(0);
            const Vec<T> kv = kt.value(h, h1, nt, nullptr, nullptr);
            if (stats) {
              const Vec<T> k0 = trim(k), kv0 = trim(kv);
              const Vec<T> ss = k0 * k0, tt = kv0 * kv0, st = k0 * kv0;
              T* r = acc_rows.data() + i;
              (Vec<T>::loadu(r) + ss).store(r);
              (Vec<T>::loadu(r + nv * V) + tt).store(r + nv * V);
              (Vec<T>::loadu(r + 2 * nv * V) + st).store(r + 2 * nv * V);
              col_ss = col_ss + ss, col_tt = col_tt + tt, col_st = col_st + st;
              k.store(cs + i, count);
              kv.store(ct + i, count);
              continue;
            }
            if (normgrad) {
              // D_ij = ½((γ_i + γ_j) Ks_ij − (α_i + α_j) Kt_ij), see kernel_gram.h.
              const Vec<T> gsum = Vec<T>::loadu(gam + i, count) + Vec<T>(coef_p[2 * j]);
              const Vec<T> asum = Vec<T>::loadu(alp + i, count) + Vec<T>(coef_p[2 * j + 1]);
              d = (gsum * k - asum * kv) * Vec<T>(T(0.5));
            } else {
              d = k - kv;
              const Vec<T> sq = trim(d * d);
              if (off) acc_off = acc_off + sq; else acc_diag = acc_diag + sq;
            }
          }
          if (grad) {
            (d * dk).store(cs + i, count);
            if (cheb) (d * dk1).store(c1s + i, count);
          }
        }
        // A column right of the diagonal block is a row of the lower triangle: its statistics by
        // symmetry. Each column belongs to one chunk, so no two tasks write the same entry.
        if (stats && off) {
          double* r = stats_p + 3 * j;
          r[0] += cpu::hsum(col_ss), r[1] += cpu::hsum(col_tt), r[2] += cpu::hsum(col_st);
        }
      }
      partial[c] = double(cpu::hsum(acc_diag)) + 2.0 * cpu::hsum(acc_off);
      if (stats) std::copy(acc_rows.begin(), acc_rows.end(), row_stats.begin() + c * 3 * nv * V);
    }
  });
  if (stats) {
    double* ri = a.ri.data_ptr<double>();
    for (int64_t c = 0; c < chunks; ++c) {
      const double* part = row_stats.data() + c * 3 * nv * V;
      for (int64_t i = 0; i < B; ++i) {
        for (int64_t q = 0; q < 3; ++q) ri[3 * i + q] += part[q * nv * V + i];
      }
    }
  }
  double total = 0;
  for (double v : partial) total += v;
  return total;
}

double panel_cpu(PanelArgs& a) {
  return a.gs.scalar_type() == at::kDouble ? panel_cpu_typed<double>(a) : panel_cpu_typed<float>(a);
}

std::tuple<at::Tensor, at::Tensor> kernel_mmd_cpu(const at::Tensor& s, const at::Tensor& t, const at::Tensor& weights,
                                                  int64_t kernel, const at::Tensor& params, int64_t panel_rows,
                                                  bool compute_grad) {
  return kernel_mmd_host(s, t, weights, kernel, params, panel_rows, compute_grad, panel_cpu, kPanelColsMajor);
}

std::tuple<at::Tensor, at::Tensor> kernel_gram_cpu(const at::Tensor& s, const at::Tensor& t, int64_t kernel,
                                                   const at::Tensor& s_params, const at::Tensor& t_params,
                                                   bool normalize_rows, int64_t panel_rows, bool compute_grad) {
  return kernel_gram_host(s, t, kernel, s_params, t_params, normalize_rows, panel_rows, compute_grad, panel_cpu,
                          kPanelColsMajor);
}

}  // namespace

TORCH_LIBRARY_IMPL(distillx, CPU, m) {
  m.impl("kernel_gram", &kernel_gram_cpu);
  m.impl("kernel_mmd", &kernel_mmd_cpu);
}

}  // namespace distillx
