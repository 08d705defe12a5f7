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

// Row-normalised mode, sweep 1: with Ks, Kt stored into the panel buffers by the row pass, add the
// column sums Σ_i Ks_ij², Σ_i Kt_ij², Σ_i Ks_ij Kt_ij of the columns right of the diagonal block
// (their rows' statistics, by symmetry) into rp.
template <typename T>
void column_stats(const T* ks, const T* kt, int64_t B, int64_t P, int64_t diag, double* rp) {
  constexpr int64_t V = Vec<T>::size();
  const int64_t blocks = (P - diag + V - 1) / V;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t j = diag + blk * V, count = std::min(V, P - j);
      Vec<T> ss(0), tt(0), st(0);
      for (int64_t i = 0; i < B; ++i) {
        const Vec<T> a = Vec<T>::loadu(ks + i * P + j, count), b = Vec<T>::loadu(kt + i * P + j, count);
        ss = ss + a * a, tt = tt + b * b, st = st + a * b;
      }
      T l_ss[V], l_tt[V], l_st[V];
      ss.store(l_ss), tt.store(l_tt), st.store(l_st);
      for (int64_t l = 0; l < count; ++l) {
        double* r = rp + 3 * (j + l);
        r[0] += l_ss[l], r[1] += l_tt[l], r[2] += l_st[l];
      }
    }
  });
}

template <typename T>
double panel_cpu_typed(PanelArgs& a) {
  const int64_t B = a.gs.size(0), P = a.gs.size(1), diag = a.diag;
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
  double* stats_i = stats ? a.ri.data_ptr<double>() : nullptr;
  // Row-normalised gradient: the per-row coefficients {γ, α} of the panel's columns as two
  // contiguous vectors for vector loads (O(N) per panel against O(B·N) work).
  at::Tensor gamma_p, alpha_p;
  if (normgrad) gamma_p = a.rp.select(1, 0).contiguous(), alpha_p = a.rp.select(1, 1).contiguous();
  const T* coef_i = normgrad ? a.ri.const_data_ptr<T>() : nullptr;
  const T* gam = normgrad ? gamma_p.const_data_ptr<T>() : nullptr;
  const T* alp = normgrad ? alpha_p.const_data_ptr<T>() : nullptr;
  constexpr int64_t V = Vec<T>::size();
  std::vector<double> partial(B, 0.0);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* rs = gs + i * P;
      T* rt = mmd ? nullptr : gt + i * P;
      T* r1s = cheb ? g1s + i * P : nullptr;
      const T* r1t = cheb && !mmd ? g1t + i * P : nullptr;
      Vec<T> acc_diag(0), acc_off(0), acc_ss(0), acc_tt(0), acc_st(0);
      // Lanes past `count` were loaded as 0 and must not count: zero them through a partial store.
      auto trim = [&](Vec<T> v, int64_t count) {
        if (count == V) return v;
        T lanes[V] = {};
        v.store(lanes, count);
        return Vec<T>::loadu(lanes);
      };
      // One column block of V lanes; `count` < V only at the row's end.
      auto block = [&](int64_t j, int64_t count, bool off) {
        const Vec<T> g = Vec<T>::loadu(rs + j, count);
        const Vec<T> h = mmd ? Vec<T>(0) : Vec<T>::loadu(rt + j, count);
        const Vec<T> g1 = cheb ? Vec<T>::loadu(r1s + j, count) : Vec<T>(0);
        const Vec<T> h1 = cheb && !mmd ? Vec<T>::loadu(r1t + j, count) : Vec<T>(0);
        const Vec<T> ns = rbf ? Vec<T>::loadu(nsp + j, count) + Vec<T>(nsi[i]) : Vec<T>(0);
        Vec<T> dk, dk1, d;
        const Vec<T> k = ks.value(g, g1, ns, grad ? &dk : nullptr, grad && cheb ? &dk1 : nullptr);
        if (mmd) {
          // MMD: the "difference" is the weight a_i a_j, the summand a_i a_j k.
          d = Vec<T>::loadu(wp + j, count) * Vec<T>(wi[i]);
          const Vec<T> sq = trim(d * k, count);
          if (off) acc_off = acc_off + sq; else acc_diag = acc_diag + sq;
        } else {
          const Vec<T> nt = rbf ? Vec<T>::loadu(ntp + j, count) + Vec<T>(nti[i]) : Vec<T>(0);
          const Vec<T> kv = kt.value(h, h1, nt, nullptr, nullptr);
          if (stats) {
            const Vec<T> k0 = trim(k, count), kv0 = trim(kv, count);
            acc_ss = acc_ss + k0 * k0, acc_tt = acc_tt + kv0 * kv0, acc_st = acc_st + k0 * kv0;
            k.store(rs + j, count);
            kv.store(rt + j, count);
            return;
          }
          if (normgrad) {
            // D_ij = ½((γ_i + γ_j) Ks_ij − (α_i + α_j) Kt_ij), see kernel_gram.h.
            const Vec<T> gsum = Vec<T>::loadu(gam + j, count) + Vec<T>(coef_i[2 * i]);
            const Vec<T> asum = Vec<T>::loadu(alp + j, count) + Vec<T>(coef_i[2 * i + 1]);
            d = (gsum * k - asum * kv) * Vec<T>(T(0.5));
          } else {
            d = k - kv;
            const Vec<T> sq = trim(d * d, count);
            if (off) acc_off = acc_off + sq; else acc_diag = acc_diag + sq;
          }
        }
        if (grad) {
          (d * dk).store(rs + j, count);
          if (cheb) (d * dk1).store(r1s + j, count);
        }
      };
      auto sweep = [&](int64_t from, int64_t to, bool off) {
        int64_t j = from;
        for (; j + V <= to; j += V) block(j, V, off);
        if (j < to) block(j, to - j, off);
      };
      sweep(0, diag, false);
      sweep(diag, P, true);
      auto hsum = [&](const Vec<T>& v) {
        T lanes[V];
        v.store(lanes);
        double sum = 0;
        for (int64_t l = 0; l < V; ++l) sum += lanes[l];
        return sum;
      };
      if (stats) {
        double* r = stats_i + 3 * i;
        r[0] += hsum(acc_ss), r[1] += hsum(acc_tt), r[2] += hsum(acc_st);
      } else {
        partial[i] = hsum(acc_diag) + 2 * hsum(acc_off);
      }
    }
  });
  if (stats) column_stats<T>(gs, gt, B, P, diag, a.rp.data_ptr<double>());
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
  return kernel_mmd_host(s, t, weights, kernel, params, panel_rows, compute_grad, panel_cpu);
}

std::tuple<at::Tensor, at::Tensor> kernel_gram_cpu(const at::Tensor& s, const at::Tensor& t, int64_t kernel,
                                                   const at::Tensor& s_params, const at::Tensor& t_params,
                                                   bool normalize_rows, int64_t panel_rows, bool compute_grad) {
  return kernel_gram_host(s, t, kernel, s_params, t_params, normalize_rows, panel_rows, compute_grad, panel_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(distillx, CPU, m) {
  m.impl("kernel_gram", &kernel_gram_cpu);
  m.impl("kernel_mmd", &kernel_mmd_cpu);
}

}  // namespace distillx
