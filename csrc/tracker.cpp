// C++ CPU implementation of the temporal tracker update (metapo_fast/reference.py:
// tracker_update_reference; Triton twin: kernels/tracker.py). State (N, 6) float32 rows
// [ema_margin, ema_std, ema_kl, mean, m2, count], updated in place; features (B, 6)
// [f1, ema1, f2, ema2, f3, ema3]. The batch is applied sequentially in order, so repeated ids
// behave as successive visits. B is tens to thousands: a serial loop beats any thread start-up.
#include <torch/extension.h>

#include <cmath>

namespace {

at::Tensor tracker_update_(at::Tensor state, const at::Tensor& ids, const at::Tensor& margins, const at::Tensor& kl,
                           double alpha) {
  TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == at::kFloat && state.dim() == 2 && state.size(1) == 6 &&
                  state.is_contiguous(),
              "tracker_update_ (C++): state must be a contiguous CPU (N, 6) float32 tensor, got ", state.sizes(), " ",
              state.scalar_type());
  const int64_t B = ids.numel();
  TORCH_CHECK(margins.numel() == B && kl.numel() == B, "tracker_update_: margins and kl must have ", B,
              " elements like ids, got ", margins.numel(), " and ", kl.numel());
  auto id = ids.to(at::kLong).contiguous();
  auto m = margins.to(at::kFloat).contiguous();
  auto k = kl.to(at::kFloat).contiguous();
  auto feats = at::empty({B, 6}, state.options());
  float* S = state.data_ptr<float>();
  float* F = feats.data_ptr<float>();
  const int64_t* I = id.data_ptr<int64_t>();
  const float* M = m.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const int64_t N = state.size(0);
  const float a = static_cast<float>(alpha);
  for (int64_t j = 0; j < B; ++j) {
    TORCH_CHECK(I[j] >= 0 && I[j] < N, "tracker_update_: ids[", j, "] = ", I[j], " is outside [0, ", N, ")");
    float* s = S + I[j] * 6;
    const float f1 = M[j], f3 = K[j];
    float f2;
    if (s[5] == 0.0f) {
      s[0] = f1; s[1] = 0.0f; s[2] = f3; s[3] = f1; s[4] = 0.0f; s[5] = 1.0f;
      f2 = 0.0f;
    } else {
      const float n = s[5] + 1.0f;
      const float d = f1 - s[3];
      s[3] += d / n;
      s[4] += d * (f1 - s[3]);
      s[5] = n;
      f2 = std::sqrt(s[4] / n);
      s[0] = a * s[0] + (1.0f - a) * f1;
      s[1] = a * s[1] + (1.0f - a) * f2;
      s[2] = a * s[2] + (1.0f - a) * f3;
    }
    float* o = F + j * 6;
    o[0] = f1; o[1] = s[0]; o[2] = f2; o[3] = s[1]; o[4] = f3; o[5] = s[2];
  }
  return feats;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metapo_fast_cpp, m) {
  m.def("tracker_update_(Tensor(a!) state, Tensor ids, Tensor margins, Tensor kl, float alpha) -> Tensor");
}

TORCH_LIBRARY_IMPL(metapo_fast_cpp, CPU, m) { m.impl("tracker_update_", &tracker_update_); }
