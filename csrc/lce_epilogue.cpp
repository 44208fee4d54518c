// C++ CPU implementation of the fused-loss epilogue (see metapo_fast/ops/lce_epilogue.py:
// lce_epilogue_forward_ref / lce_epilogue_backward_ref_ for the math, and
// kernels/lce_epilogue.py for the Triton twin).
//
//   forward  (per row r of an (n, V) logits chunk, optional reference logits y):
//     lse_r = logsumexp_v x_rv,  logp_r = x_r,t - lse_r,  ref_logp_r = y_r,t - logsumexp_v y_rv,
//     kl_r  = sum_v softmax(x_r)_v (x_rv - y_rv) - lse_r + lse_y_r
//           = E_p[(x - max x) - (y - max y)] - log sum exp(x - max x) + log sum exp(y - max y)  (computed so)
//   backward (in place): x_rv <- coef_r * (1[v == t_r] - exp(x_rv - lse_r))
//   forward "into" (lce_epilogue_fwd_into): the forward writing logp / ref_logp / kl into columns 0 / 1 / 2
//     of a caller's (n, K) statistics buffer (any row stride), returning only lse; with grad=true it then
//     overwrites the row with the backward's gradient for coef_r = 1 while the row is still in cache (the
//     streamed-pair blocks of the fused loss: one op instead of two).
//
// Rows run in parallel (at::parallel_for). Each row is read twice (max, then the exp sums, in double
// accumulators); a row
// of V = 32000 fp32 is 128 KB and stays in L2 between the two passes. exp is a degree-6 polynomial
// after range reduction (relative error < 2e-7 in float), written so that gcc -O3 -march=native
// vectorises the loops; glibc's vector expf would need -ffast-math, which breaks -inf logits.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

inline float fast_exp(float x) {
  // exp(x) = 2^k * exp(r), r = x - k ln2 in [-ln2/2, ln2/2]. Inputs here are <= 0 (x - max).
  x = x < -87.0f ? -87.0f : x;  // exp(-87) = 1.6e-38: below anything that matters in a sum
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
  float p = 1.9875691500e-4f;  // Cephes expf minimax polynomial
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }

// Sums over the vocabulary accumulate in double (the exps stay float), in blocks of kBlock entries.
// One float sum over all of V = 32003 drifted by 2.8e-5 in lse (PyTorch: 1.2e-7), growing with V,
// and the KL's cross term lost 6e-5 where a row's mass sits on one logit (tests/test_lce_epilogue.py);
// double accumulators bring lse and KL to PyTorch's fp32 level or better.
constexpr int64_t kBlock = 1024;

template <typename acc_t> struct Acc {};
template <> struct Acc<float> { using type = float; };
template <> struct Acc<double> { using type = double; };
template <> struct Acc<c10::BFloat16> { using type = float; };
template <> struct Acc<c10::Half> { using type = float; };

// In place: x_v <- c * (1[v == t] - exp(x_v - l)) over one row.
template <typename scalar_t, typename acc_t>
inline void grad_row(scalar_t* x, int64_t V, int64_t t, acc_t l, acc_t c) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) x[v] = static_cast<scalar_t>(-c * fast_exp(static_cast<acc_t>(x[v]) - l));
  x[t] = static_cast<scalar_t>(static_cast<acc_t>(x[t]) + c);
}

// Outputs: LSE[r]; LP / RLP / KL at r * so (so: the row stride of the output, 1 for separate vectors).
// grad: then the row's gradient for coefficient 1, in place.
template <typename scalar_t>
void forward_impl(scalar_t* X, const int64_t n, const int64_t V, const scalar_t* Y, const int64_t* T,
                  typename Acc<scalar_t>::type* LSE, typename Acc<scalar_t>::type* LP, typename Acc<scalar_t>::type* RLP,
                  typename Acc<scalar_t>::type* KL, const int64_t so, const bool grad) {
  using acc_t = typename Acc<scalar_t>::type;
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* x = X + r * V;
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : mx)
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, static_cast<acc_t>(x[v]));
      const int64_t t = T[r];
      if (!Y) {
        double sx = 0;  // blocked sums, double accumulators
        for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
          const int64_t v1 = std::min(V, v0 + kBlock);
          double bx = 0;
#pragma omp simd reduction(+ : bx)
          for (int64_t v = v0; v < v1; ++v) bx += fast_exp(static_cast<acc_t>(x[v]) - mx);
          sx += bx;
        }
        LSE[r] = mx + static_cast<acc_t>(std::log(sx));
        LP[r * so] = static_cast<acc_t>(x[t]) - LSE[r];
        if (grad) grad_row<scalar_t, acc_t>(x, V, t, LSE[r], acc_t(1));
        continue;
      }
      const scalar_t* y = Y + r * V;
      acc_t my = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : my)
      for (int64_t v = 0; v < V; ++v) my = std::max(my, static_cast<acc_t>(y[v]));
      double sx = 0, sy = 0, sxy = 0;  // blocked sums, as above
      for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
        const int64_t v1 = std::min(V, v0 + kBlock);
        double bx = 0, by = 0, bxy = 0;
#pragma omp simd reduction(+ : bx, by, bxy)
        for (int64_t v = v0; v < v1; ++v) {
          const acc_t dx = static_cast<acc_t>(x[v]) - mx, dy = static_cast<acc_t>(y[v]) - my;
          const acc_t ex = fast_exp(dx);
          bx += ex;
          by += fast_exp(dy);
          bxy += dx > -87.0f ? ex * (dx - dy) : 0.0f;  // centred (mx and my cancel); a -inf logit adds 0, not NaN
        }
        sx += bx;
        sy += by;
        sxy += bxy;
      }
      const double lx = mx + std::log(sx), ly = my + std::log(sy);
      LSE[r] = static_cast<acc_t>(lx);
      LP[r * so] = static_cast<acc_t>(static_cast<double>(x[t]) - lx);
      RLP[r * so] = static_cast<acc_t>(static_cast<double>(y[t]) - ly);
      KL[r * so] = static_cast<acc_t>(sxy / sx - std::log(sx) + std::log(sy));  // E_p[(x-mx)-(y-my)] - log sx + log sy
      if (grad) grad_row<scalar_t, acc_t>(x, V, t, LSE[r], acc_t(1));
    }
  });
}

template <typename scalar_t>
void backward_impl(at::Tensor& logits, const at::Tensor& lse, const at::Tensor& targets, const at::Tensor& coef) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t n = logits.size(0), V = logits.size(1);
  scalar_t* X = logits.data_ptr<scalar_t>();
  const acc_t* LSE = lse.data_ptr<acc_t>();
  const acc_t* C = coef.data_ptr<acc_t>();
  const int64_t* T = targets.data_ptr<int64_t>();
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) grad_row<scalar_t, acc_t>(X + r * V, V, T[r], LSE[r], C[r]);
  });
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_common(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2, "lce_epilogue: logits must be 2-D (n, V), got ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), "lce_epilogue: logits must be contiguous");
  TORCH_CHECK(logits.device().is_cpu(), "lce_epilogue (C++): logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), "lce_epilogue: targets must have shape (",
              logits.size(0), ",), got ", targets.sizes());
}

// The forward's checked inputs: int64 targets, and the reference logits in the logits' dtype.
std::pair<at::Tensor, c10::optional<at::Tensor>> forward_inputs(const at::Tensor& logits, const at::Tensor& targets,
                                                                const c10::optional<at::Tensor>& ref_logits) {
  check_common(logits, targets);
  c10::optional<at::Tensor> ref;
  if (ref_logits.has_value()) {
    TORCH_CHECK(ref_logits->sizes() == logits.sizes(), "lce_epilogue: ref_logits must have the shape of logits ", logits.sizes(),
                ", got ", ref_logits->sizes());
    ref = ref_logits->to(logits.scalar_type()).contiguous();
  }
  return {targets.to(at::kLong).contiguous(), ref};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lce_epilogue_fwd(const at::Tensor& logits, const at::Tensor& targets,
                                                                          const c10::optional<at::Tensor>& ref_logits) {
  const auto inputs = forward_inputs(logits, targets, ref_logits);  // (no structured binding: lambdas capture these)
  const at::Tensor& tgt = inputs.first;
  const c10::optional<at::Tensor>& ref = inputs.second;
  const auto opts = logits.options().dtype(acc_type(logits.scalar_type()));
  const int64_t n = logits.size(0);
  auto lse = at::empty({n}, opts), logp = at::empty({n}, opts);
  auto ref_logp = at::empty({ref ? n : 0}, opts), kl = at::empty({ref ? n : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "lce_epilogue_fwd", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    forward_impl<scalar_t>(const_cast<scalar_t*>(logits.data_ptr<scalar_t>()), n, logits.size(1),
                           ref ? ref->data_ptr<scalar_t>() : nullptr, tgt.data_ptr<int64_t>(), lse.data_ptr<acc_t>(),
                           logp.data_ptr<acc_t>(), ref ? ref_logp.data_ptr<acc_t>() : nullptr,
                           ref ? kl.data_ptr<acc_t>() : nullptr, 1, false);
  });
  return {lse, logp, ref_logp, kl};
}

at::Tensor lce_epilogue_fwd_into(at::Tensor logits, const at::Tensor& targets, const c10::optional<at::Tensor>& ref_logits,
                                 at::Tensor stats, bool grad) {
  const auto inputs = forward_inputs(logits, targets, ref_logits);  // (no structured binding: lambdas capture these)
  const at::Tensor& tgt = inputs.first;
  const c10::optional<at::Tensor>& ref = inputs.second;
  const int64_t n = logits.size(0), cols = ref ? 3 : 1;
  const auto acc = acc_type(logits.scalar_type());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == n && stats.size(1) >= cols && stats.stride(1) == 1 &&
              stats.scalar_type() == acc && stats.device().is_cpu(),
              "lce_epilogue: stats must be a CPU (", n, ", >=", cols, ") ", acc, " tensor with unit column stride, got ",
              stats.sizes(), " ", stats.scalar_type(), " strides ", stats.strides());
  auto lse = at::empty({n}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "lce_epilogue_fwd_into", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    acc_t* S = stats.data_ptr<acc_t>();
    forward_impl<scalar_t>(logits.data_ptr<scalar_t>(), n, logits.size(1), ref ? ref->data_ptr<scalar_t>() : nullptr,
                           tgt.data_ptr<int64_t>(), lse.data_ptr<acc_t>(), S, ref ? S + 1 : nullptr, ref ? S + 2 : nullptr,
                           stats.stride(0), grad);
  });
  return lse;
}

void lce_epilogue_bwd_(at::Tensor logits, const at::Tensor& lse, const at::Tensor& targets, const at::Tensor& coef) {
  check_common(logits, targets);
  const auto acc = acc_type(logits.scalar_type());
  TORCH_CHECK(lse.numel() == logits.size(0) && coef.numel() == logits.size(0), "lce_epilogue: lse and coef must have ",
              logits.size(0), " elements, got ", lse.numel(), " and ", coef.numel());
  auto l = lse.to(acc).contiguous(), c = coef.to(acc).contiguous();
  auto tgt = targets.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "lce_epilogue_bwd", [&] {
    backward_impl<scalar_t>(logits, l, tgt, c);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metapo_fast_cpp, m) {
  m.def("lce_epilogue_fwd(Tensor logits, Tensor targets, Tensor? ref_logits) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lce_epilogue_bwd_(Tensor(a!) logits, Tensor lse, Tensor targets, Tensor coef) -> ()");
  m.def("lce_epilogue_fwd_into(Tensor(a!) logits, Tensor targets, Tensor? ref_logits, Tensor(b!) stats, bool grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(metapo_fast_cpp, CPU, m) {
  m.impl("lce_epilogue_fwd", &lce_epilogue_fwd);
  m.impl("lce_epilogue_bwd_", &lce_epilogue_bwd_);
  m.impl("lce_epilogue_fwd_into", &lce_epilogue_fwd_into);
}
