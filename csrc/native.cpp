// Torch bindings of the two CPU primitives (docs/design.md, "Backends and builds"): rows in parallel
// with at::parallel_for (OpenMP; follows torch.set_num_threads), one row per task, so results do not
// depend on the thread count. The per-row math is in row_kernels.h.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "row_kernels.h"

namespace fastrl {
namespace {

Transform make_transform(double temperature, double logit_scale, double softcap) {
  TORCH_CHECK(temperature > 0, "temperature: expected a number > 0, got ", temperature);
  TORCH_CHECK(logit_scale > 0, "logit_scale: expected a number > 0, got ", logit_scale);
  TORCH_CHECK(softcap >= 0, "softcap: expected a number > 0 (or 0 for none), got ", softcap);
  Transform tr;
  tr.k = softcap > 0 ? softcap / temperature : logit_scale / temperature;
  tr.k_hi = static_cast<float>(tr.k);
  tr.softcap_in = softcap > 0 ? static_cast<float>(logit_scale / softcap) : 0.0f;
  tr.dxdz = static_cast<float>(logit_scale / temperature);
  return tr;
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.device().is_cpu(), name, ": expected a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, name, ": expected 2-D [N, V], got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
              ": expected float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(logits.size(1) == 0 || logits.stride(1) == 1, name, ": expected stride(-1) == 1, got ",
              logits.stride(1));
}

void check_rows(const at::Tensor& t, int64_t n, at::ScalarType dt, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == n && t.scalar_type() == dt &&
                  t.is_contiguous(),
              name, ": expected a contiguous CPU ", dt, " tensor of shape [", n, "], got ", t.scalar_type(),
              " of shape ", t.sizes());
}

// Every target must be a class index or ignore_index; checked once, before any row is touched.
void check_targets(const at::Tensor& targets, int64_t n, int64_t v, int64_t ignore_index) {
  check_rows(targets, n, at::kLong, "targets");
  const int64_t* y = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(y[i] == ignore_index || (y[i] >= 0 && y[i] < v), "targets: expected values in [0, ", v,
                ") or ignore_index=", ignore_index, ", got ", y[i], " at row ", i);
  }
}

template <class T>
struct Elem {
  using type = T;
};

// Calls f(Elem<T>{}) for the logits' element type (checked by check_logits).
template <class F>
void dispatch_dtype(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat:
      f(Elem<float>{});
      break;
    case at::kBFloat16:
      f(Elem<c10::BFloat16>{});
      break;
    case at::kHalf:
      f(Elem<c10::Half>{});
      break;
    default:
      TORCH_CHECK(false, "logits: unsupported dtype ", dt);
  }
}

// The first row in [from, end) that is not ignored (end if none): the rows' sweeps prefetch its start.
int64_t next_kept(const int64_t* y, int64_t from, int64_t end, int64_t ignore_index) {
  while (from < end && y[from] == ignore_index) ++from;
  return from;
}

int64_t grain_rows(int64_t v) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(v, 1)); }

template <class T, bool SOFTCAP, bool WITH_Q>
void stats_rows(const at::Tensor& logits, const int64_t* y, int64_t ignore_index, const Transform& tr,
                float* logp, float* ent, double* lse, double* mean_x, float* lsp2) {
  const int64_t n = logits.size(0), v = logits.size(1), rs = logits.stride(0);
  const T* base = logits.data_ptr<T>();
  at::parallel_for(0, n, grain_rows(v), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (y[i] == ignore_index) {
        logp[i] = ent[i] = 0.0f;
        lse[i] = mean_x[i] = 0.0;
        if (WITH_Q) lsp2[i] = 0.0f;
        continue;
      }
      const int64_t next = next_kept(y, i + 1, end, ignore_index);
      const RowStatsOut o =
          row_stats<Simd, SOFTCAP, WITH_Q>(base + i * rs, v, y[i], tr, next < end ? base + next * rs : nullptr);
      logp[i] = o.logp;
      ent[i] = o.entropy;
      lse[i] = o.lse;
      mean_x[i] = o.mean_x;
      if (WITH_Q) lsp2[i] = o.log_sum_p2;
    }
  });
}

std::vector<at::Tensor> stats(const at::Tensor& logits, const at::Tensor& targets, double temperature,
                              double logit_scale, double softcap, int64_t ignore_index, bool with_log_sum_p2) {
  check_logits(logits, "logits");
  const int64_t n = logits.size(0), v = logits.size(1);
  TORCH_CHECK(v >= 1, "logits: expected V >= 1 columns, got shape ", logits.sizes());
  check_targets(targets, n, v, ignore_index);
  const Transform tr = make_transform(temperature, logit_scale, softcap);
  const auto opts = logits.options().dtype(at::kFloat);
  // lse and mean_x are float64 (core.CoreStats): pass 2 takes them apart to keep p exact at |x| = 1e4.
  const auto wide = logits.options().dtype(at::kDouble);
  at::Tensor logp = at::empty({n}, opts), ent = at::empty({n}, opts), lse = at::empty({n}, wide),
             mean_x = at::empty({n}, wide);
  at::Tensor lsp2 = with_log_sum_p2 ? at::empty({n}, opts) : at::Tensor();
  float* lsp2_ptr = with_log_sum_p2 ? lsp2.data_ptr<float>() : nullptr;
  const int64_t* y = targets.data_ptr<int64_t>();
  auto run = [&](auto elem, auto softcap_tag, auto q_tag) {
    stats_rows<typename decltype(elem)::type, decltype(softcap_tag)::value, decltype(q_tag)::value>(
        logits, y, ignore_index, tr, logp.data_ptr<float>(), ent.data_ptr<float>(), lse.data_ptr<double>(),
        mean_x.data_ptr<double>(), lsp2_ptr);
  };
  auto run_dtype = [&](auto elem) {
    using T_ = std::true_type;
    using F_ = std::false_type;
    if (softcap > 0) {
      with_log_sum_p2 ? run(elem, T_{}, T_{}) : run(elem, T_{}, F_{});
    } else {
      with_log_sum_p2 ? run(elem, F_{}, T_{}) : run(elem, F_{}, F_{});
    }
  };
  dispatch_dtype(logits.scalar_type(), run_dtype);
  std::vector<at::Tensor> out{logp, ent, lse, mean_x};
  if (with_log_sum_p2) out.push_back(lsp2);
  return out;
}

template <class T, bool SOFTCAP>
void grad_rows(const at::Tensor& logits, at::Tensor& out, const int64_t* y, int64_t ignore_index,
               const double* lse, const double* mean_x, const float* g_lp, const float* g_h, const Transform& tr) {
  const int64_t n = logits.size(0), v = logits.size(1);
  const int64_t rs = logits.stride(0), os = out.stride(0);
  const T* base = logits.data_ptr<T>();
  T* obase = out.data_ptr<T>();
  at::parallel_for(0, n, grain_rows(v), [&](int64_t begin, int64_t end) {
    ZeroRows zeros;  // this task's ignored rows, written during its kept rows' sweeps
    for (int64_t i = begin; i < end; ++i) {
      T* o = obase + i * os;
      if (y[i] == ignore_index) {
        zeros.push(reinterpret_cast<char*>(o), reinterpret_cast<char*>(o + v));
        continue;
      }
      const int64_t next = next_kept(y, i + 1, end, ignore_index);
      row_grad<Simd, SOFTCAP>(base + i * rs, o, v, y[i], lse[i], mean_x[i], g_lp[i], g_h[i], tr, zeros,
                              next < end ? base + next * rs : nullptr);
    }
    zeros.drain();
    store_fence();
  });
}

at::Tensor grad(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                const at::Tensor& mean_x, const at::Tensor& g_lp, const at::Tensor& g_entropy, at::Tensor out,
                double temperature, double logit_scale, double softcap, int64_t ignore_index) {
  check_logits(logits, "logits");
  check_logits(out, "out");
  const int64_t n = logits.size(0), v = logits.size(1);
  TORCH_CHECK(v >= 1, "logits: expected V >= 1 columns, got shape ", logits.sizes());
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type(),
              "out: expected shape ", logits.sizes(), " and dtype ", logits.scalar_type(), ", got ", out.sizes(),
              " and ", out.scalar_type());
  check_targets(targets, n, v, ignore_index);
  check_rows(lse, n, at::kDouble, "stats.lse");
  check_rows(mean_x, n, at::kDouble, "stats.mean_x");
  check_rows(g_lp, n, at::kFloat, "g_lp");
  check_rows(g_entropy, n, at::kFloat, "g_entropy");
  const Transform tr = make_transform(temperature, logit_scale, softcap);
  const int64_t* y = targets.data_ptr<int64_t>();
  auto run = [&](auto elem, auto softcap_tag) {
    grad_rows<typename decltype(elem)::type, decltype(softcap_tag)::value>(
        logits, out, y, ignore_index, lse.data_ptr<double>(), mean_x.data_ptr<double>(), g_lp.data_ptr<float>(),
        g_entropy.data_ptr<float>(), tr);
  };
  dispatch_dtype(logits.scalar_type(), [&](auto elem) {
    softcap > 0 ? run(elem, std::true_type{}) : run(elem, std::false_type{});
  });
  return out;
}

}  // namespace
}  // namespace fastrl

namespace fastrl {

// A fresh N x V gradient buffer is first touched by pass 2; at 4 KiB pages that is one page fault per
// 4 KiB (about 190 ms for 512 MiB on the reference machine, more than the pass itself). Asking for
// transparent huge pages on the buffer's 2 MiB-aligned interior makes it 512x fewer faults. Advice only:
// a kernel without THP (or "never") ignores it and nothing changes. Returns whether the call succeeded.
bool advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.numel()) * t.element_size();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  if (last <= first) return false;
  return madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) == 0;
#else
  (void)t;
  return false;
#endif
}

}  // namespace fastrl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("advise_huge_pages", &fastrl::advise_huge_pages,
        "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior of a fresh CPU buffer", py::arg("tensor"));
  m.doc() = "fastrl_kernels native CPU primitives: stats (pass 1) and grad (pass 2) over [N, V] logits";
  m.def("stats", &fastrl::stats, "Per-row logp, entropy, lse, mean_x [, log_sum_p2] ([N]; lse and mean_x float64)",
        py::arg("logits"), py::arg("targets"), py::arg("temperature"), py::arg("logit_scale"),
        py::arg("softcap"), py::arg("ignore_index"), py::arg("with_log_sum_p2"));
  m.def("grad", &fastrl::grad, "dL/dlogits written into out (may alias logits)", py::arg("logits"),
        py::arg("targets"), py::arg("lse"), py::arg("mean_x"), py::arg("g_lp"), py::arg("g_entropy"),
        py::arg("out"), py::arg("temperature"), py::arg("logit_scale"), py::arg("softcap"),
        py::arg("ignore_index"));
  m.attr("isa") = fastrl::Simd::name;
}
