// CPU kernels for MLX that make batching exact: a row of a batch gets the very numbers it gets
// alone, whatever the other rows, the number of rows and how a prompt is split into passes.
//
// Products y = x @ w.T. A frame of CSM multiplies 1 to 8 rows (one per stream of the batch) by
// every weight matrix. BLAS sgemm packs the weights for such a product and computes it at a
// fraction of the memory bandwidth (MKL: 4 rows cost ~3.5x one row on one thread); here each
// weight row is read once, straight from memory, for all rows of x at a time, so 4 rows cost
// little more than one. A prompt's many rows take each block of weight rows, once it is in
// cache, through all of its rows (cpu_kernels_lanes.inc). Each output element is summed in one
// order (W lanes along k, W = 16 where AVX-512 runs and 8 elsewhere, then the lanes in a fixed
// tree, then the tail) whatever the rows, the thread or the block.
// BLAS does not promise that: MKL's row 0 of an 8192 x 2048 product moves by up to 1.2e-4
// between 1 and 400 rows.
//
// Attention. Each query's output is a softmax over exactly the keys it may see, summed in key
// order: the keys a mask hides (a batch's padding, later rows) take no part in any sum, where
// the composed product-softmax-product adds their zeros at positions that shift with the
// padding and the pass.

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/fast.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

constexpr int MAX_ROWS = 8;        // rows of x per pass over the weights
constexpr int64_t BLOCK = 32;      // weight rows a thread takes at a time
constexpr int64_t PREFETCH = 256;  // floats ahead in each weight row

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
bool cpu_supported() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#pragma GCC pop_options
#else
bool cpu_supported() {
  return true;
}
#endif


inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Threads that share the tasks of one job with the thread that runs it. Tasks are taken one at
// a time, so a thread the OS deschedules (the server's audio threads share the cores) delays the
// job by one task, not by its whole share. Idle workers spin for a short while (the products of
// a frame follow each other closely), then sleep.
//
// The job's state is one word, (job:24 | tasks:20 | next task:20), claimed by compare-and-swap:
// a worker still looking at the last job cannot take a task of the next one by mistake, and
// the job's fields are read only after a claim of it succeeded.
class Pool {
 public:
  static constexpr int64_t MAX_TASKS = int64_t(1) << 20;

  explicit Pool(int threads) {
    for (int i = 1; i < threads; i++) workers_.emplace_back([this] { loop(); });
  }

  int threads() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  // task(i) for i in [0, tasks), on this thread and the workers
  void run(int64_t tasks, const std::function<void(int64_t)>& task) {
    std::lock_guard<std::mutex> one_at_a_time(run_mutex_);  // CPU streams of other threads
    task_ = &task;
    job_ = (job_ + 1) & 0xFFFFFF;
    done_.store(0, std::memory_order_relaxed);
    state_.store((job_ << 40) | (static_cast<uint64_t>(tasks) << 20), std::memory_order_release);
    if (!workers_.empty() && tasks > 1) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        wakes_.fetch_add(1, std::memory_order_release);
      }
      wake_.notify_all();
    }
    work();
    while (done_.load(std::memory_order_acquire) < static_cast<uint64_t>(tasks)) cpu_relax();
  }

 private:
  void work() {
    uint64_t state = state_.load(std::memory_order_acquire);
    for (;;) {
      uint64_t tasks = (state >> 20) & 0xFFFFF, next = state & 0xFFFFF;
      if (next >= tasks) return;
      if (!state_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel, std::memory_order_acquire))
        continue;
      (*task_)(static_cast<int64_t>(next));
      done_.fetch_add(1, std::memory_order_release);
      state = state_.load(std::memory_order_acquire);
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
      while (wakes_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
        cpu_relax();
      if (wakes_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return wakes_.load(std::memory_order_acquire) != seen; });
      }
      seen = wakes_.load(std::memory_order_acquire);
      work();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_, run_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> wakes_{0}, state_{0}, done_{0};
  uint64_t job_ = 0;  // the calling thread's own
  const std::function<void(int64_t)>* task_ = nullptr;
};

int default_threads() {
  // memory bandwidth bounds the few-row products: a few threads reach it
  unsigned n = std::thread::hardware_concurrency();
  return static_cast<int>(n == 0 ? 1 : std::min(n, 4u));
}

Pool& pool() {
  // workers are never joined: they sleep at exit, and joining them from a static destructor
  // could wait on a thread the runtime has already stopped
  static Pool* p = new Pool(default_threads());
  return *p;
}

// The products, once per vector width (cpu_kernels_lanes.inc); the widest this CPU runs is used.
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace lanes8 {
constexpr int W = 8;
#include "cpu_kernels_lanes.inc"
}  // namespace lanes8
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace lanes16 {
constexpr int W = 16;
#include "cpu_kernels_lanes.inc"
}  // namespace lanes16
#pragma GCC pop_options
#else
namespace lanes8 {
constexpr int W = 8;
#include "cpu_kernels_lanes.inc"
}  // namespace lanes8
#endif

// Attention in the 8-lane build's vectors: its sums need no order shared with the products.
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace lanes8 {

// One query's attention over the keys it may see (visible(j), j < S), in key order: q (D),
// keys and values at k + j * k_step, v + j * v_step; out (D); scores, S floats of scratch.
template <typename Visible>
void attend(const float* q, const float* k, int64_t k_step, const float* v, int64_t v_step, int64_t S, int64_t D,
            float scale, Visible visible, float* out, float* scores) {
  const int64_t dv = D / W * W;
  float qs[512];  // D <= 512, checked when the op is made
  for (int64_t d = 0; d < D; d++) qs[d] = q[d] * scale;
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < S; j++) {
    if (!visible(j)) continue;
    const float* kj = k + j * k_step;
    vf acc = {};
    for (int64_t d = 0; d < dv; d += W) acc += loadv(qs + d) * loadv(kj + d);
    float s = sum_lanes(acc);
    for (int64_t d = dv; d < D; d++) s += qs[d] * kj[d];
    scores[j] = s;
    top = std::max(top, s);
  }
  std::fill(out, out + D, 0.0f);
  float total = 0.0f;
  for (int64_t j = 0; j < S; j++) {
    if (!visible(j)) continue;
    const float p = std::exp(scores[j] - top);
    total += p;
    const float* vj = v + j * v_step;
    const vf pv = vf{} + p;
    for (int64_t d = 0; d < dv; d += W) storev(out + d, loadv(out + d) + pv * loadv(vj + d));
    for (int64_t d = dv; d < D; d++) out[d] += p * vj[d];
  }
  if (total > 0.0f)  // a query that sees no key (a padding row) stays 0
    for (int64_t d = 0; d < D; d++) out[d] /= total;
}

}  // namespace lanes8
#if defined(__x86_64__)
#pragma GCC pop_options
#endif

// 16 lanes where AVX-512 runs (CSM_MLX_KERNEL_LANES=8 keeps 8): fixed for the process, so that
// every product sums in the same order.
int lanes() {
  static const int n = [] {
#if defined(__x86_64__)
    const char* env = std::getenv("CSM_MLX_KERNEL_LANES");
    if (__builtin_cpu_supports("avx512f") && !(env != nullptr && std::string(env) == "8")) return 16;
#endif
    return 8;
  }();
  return n;
}

void products(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
#if defined(__x86_64__)
  if (lanes() == 16) return lanes16::products(x, w, y, M, K, N);
#endif
  lanes8::products(x, w, y, M, K, N);
}

void check_cpu_float32(const char* op, std::initializer_list<const mx::array*> arrays) {
  for (auto* a : arrays)
    if (a->dtype() != mx::float32) throw std::invalid_argument(std::string("[") + op + "] takes float32 arrays");
  if (mx::default_stream(mx::default_device()).device != mx::Device::cpu)
    throw std::invalid_argument(std::string("[") + op + "] runs on the CPU only");
}

class ExactMatmul : public mx::UnaryPrimitive {
 public:
  explicit ExactMatmul(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    const auto& w = inputs[1];
    if (!x.flags().row_contiguous || !w.flags().row_contiguous)
      throw std::invalid_argument("[exact_matmul] inputs must be row-contiguous");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_output_array(out);
    encoder.dispatch([x = mx::array::unsafe_weak_copy(x), w = mx::array::unsafe_weak_copy(w),
                      out = mx::array::unsafe_weak_copy(out)]() mutable {
      products(x.data<float>(), w.data<float>(), out.data<float>(), x.shape(0), x.shape(1), w.shape(0));
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[exact_matmul] runs on the CPU only");
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    const auto& x = primals[0];
    const auto& w = primals[1];
    const auto& c = cotangents[0];
    std::vector<mx::array> grads;
    for (int arg : argnums)
      grads.push_back(arg == 0 ? mx::matmul(c, w, stream()) : mx::matmul(mx::transpose(c, stream()), x, stream()));
    return grads;
  }

  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override {
    std::optional<mx::array> y;
    for (size_t i = 0; i < argnums.size(); i++) {
      auto term = argnums[i] == 0 ? mx::matmul(tangents[i], mx::transpose(primals[1], stream()), stream())
                                  : mx::matmul(primals[0], mx::transpose(tangents[i], stream()), stream());
      y = y ? mx::add(*y, term, stream()) : term;
    }
    return {*y};
  }

  const char* name() const override {
    return "ExactMatmul";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return typeid(*this) == typeid(other);
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[1].shape(0)}};
  }
};

mx::array exact_matmul(const mx::array& x, const mx::array& w) {
  if (x.ndim() != 2 || w.ndim() != 2 || x.shape(1) != w.shape(1))
    throw std::invalid_argument("[exact_matmul] takes x (M, K) and w (N, K)");
  if (w.shape(0) > (Pool::MAX_TASKS - 1) * BLOCK)
    throw std::invalid_argument("[exact_matmul] w has too many rows");
  check_cpu_float32("exact_matmul", {&x, &w});
  auto stream = mx::default_stream(mx::default_device());
  return mx::array({x.shape(0), w.shape(0)}, mx::float32, std::make_shared<ExactMatmul>(stream),
                   {mx::contiguous(x, false, stream), mx::contiguous(w, false, stream)});
}

// queries are handed to the pool in at most this many tasks (its job word holds 20-bit counts)
constexpr int64_t MAX_QUERY_TASKS = 65536;

// q (B, Hq, L, D), k and v (B, Hkv, S, D) with any strides but the last; mask, when given,
// (B or 1, L, S) bool and row-contiguous; causal: query i sees keys up to S - L + i.
class ExactAttention : public mx::UnaryPrimitive {
 public:
  ExactAttention(mx::Stream stream, float scale, bool causal, bool masked)
      : mx::UnaryPrimitive(stream), scale_(scale), causal_(causal), masked_(masked) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    for (int i = 0; i < 3; i++)
      if (inputs[i].strides().back() != 1)
        throw std::invalid_argument("[exact_attention] q, k and v must be contiguous in their last axis");
    if (masked_ && !inputs[3].flags().row_contiguous)
      throw std::invalid_argument("[exact_attention] the mask must be row-contiguous");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    std::vector<mx::array> weak;
    for (const auto& a : inputs) weak.push_back(mx::array::unsafe_weak_copy(a));
    encoder.dispatch([weak = std::move(weak), out = mx::array::unsafe_weak_copy(out), scale = scale_,
                      causal = causal_, masked = masked_]() mutable {
      const auto &q = weak[0], &k = weak[1], &v = weak[2];
      const int64_t B = q.shape(0), Hq = q.shape(1), L = q.shape(2), D = q.shape(3);
      const int64_t Hkv = k.shape(1), S = k.shape(2), group = Hq / Hkv;
      const bool* mask = masked ? weak[3].data<bool>() : nullptr;
      const int64_t mask_batch = masked && weak[3].shape(0) > 1 ? L * S : 0;
      const float *qp = q.data<float>(), *kp = k.data<float>(), *vp = v.data<float>();
      float* op = out.data<float>();
      const int64_t queries = B * Hq * L, per_task = (queries + MAX_QUERY_TASKS - 1) / MAX_QUERY_TASKS;
      pool().run((queries + per_task - 1) / per_task, [&](int64_t task) {
        thread_local std::vector<float> scores;
        scores.resize(S);
        for (int64_t n = task * per_task; n < std::min(queries, (task + 1) * per_task); n++) {
          const int64_t i = n % L, h = n / L % Hq, b = n / L / Hq, hk = h / group;
          const bool* row = mask ? mask + b * mask_batch + i * S : nullptr;
          const int64_t last = causal ? S - L + i : S - 1;
          auto visible = [&](int64_t j) { return j <= last && (row == nullptr || row[j]); };
          lanes8::attend(qp + b * q.strides(0) + h * q.strides(1) + i * q.strides(2),
                 kp + b * k.strides(0) + hk * k.strides(1), k.strides(2), vp + b * v.strides(0) + hk * v.strides(1),
                 v.strides(2), S, D, scale, visible, op + n * D, scores.data());
        }
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[exact_attention] runs on the CPU only");
  }

  // Training takes mx.fast's gradient: the same function, up to the order of the sums.
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    std::optional<mx::array> mask;
    if (masked_) mask = mx::expand_dims(primals[3], 1, stream());  // (B, 1, L, S): over all heads
    auto attention = [&](const std::vector<mx::array>& in) {
      return std::vector<mx::array>{mx::fast::scaled_dot_product_attention(
          in[0], in[1], in[2], scale_, causal_ ? "causal" : "", mask, {}, false, stream())};
    };
    auto grads = mx::vjp(attention, {primals[0], primals[1], primals[2]}, cotangents).second;
    std::vector<mx::array> out;
    for (int arg : argnums) {
      if (arg > 2) throw std::invalid_argument("[exact_attention] has no gradient for the mask");
      out.push_back(grads[arg]);
    }
    return out;
  }

  const char* name() const override {
    return "ExactAttention";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    if (typeid(*this) != typeid(other)) return false;
    const auto& o = static_cast<const ExactAttention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_ && masked_ == o.masked_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float scale_;
  bool causal_, masked_;
};

mx::array exact_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                          const std::optional<mx::array>& mask) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape() || q.shape(0) != k.shape(0) ||
      q.shape(3) != k.shape(3) || k.shape(1) == 0 || q.shape(1) % k.shape(1) != 0)
    throw std::invalid_argument("[exact_attention] takes q (B, Hq, L, D), k and v (B, Hkv, S, D), Hq a multiple of Hkv");
  if (q.shape(3) > 512) throw std::invalid_argument("[exact_attention] takes heads of at most 512 dims");
  if (q.shape(2) > k.shape(2)) throw std::invalid_argument("[exact_attention] has more queries than keys");
  check_cpu_float32("exact_attention", {&q, &k, &v});
  auto stream = mx::default_stream(mx::default_device());
  std::vector<mx::array> inputs = {q, k, v};
  if (mask) {
    const auto& m = *mask;
    if (m.dtype() != mx::bool_ || m.ndim() != 3 || (m.shape(0) != 1 && m.shape(0) != q.shape(0)) ||
        m.shape(1) != q.shape(2) || m.shape(2) != k.shape(2))
      throw std::invalid_argument("[exact_attention] takes a bool mask (B or 1, L, S)");
    inputs.push_back(mx::contiguous(m, false, stream));
  }
  return mx::array(q.shape(), mx::float32, std::make_shared<ExactAttention>(stream, scale, causal, mask.has_value()),
                   std::move(inputs));
}

}  // namespace

NB_MODULE(_cpu_kernels, m) {
  m.doc() = "CPU kernels for MLX whose every output is computed in one order, whatever the batch.";
  m.def("exact_matmul", &exact_matmul, nb::arg("x"), nb::arg("w"),
        "x (M, K) @ w (N, K).T in float32 on the CPU stream, each element summed in an order "
        "independent of M; bandwidth-bound for 1-8 rows.");
  m.def("exact_attention", &exact_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::kw_only(),
        nb::arg("scale"), nb::arg("causal") = false, nb::arg("mask") = nb::none(),
        "Scaled dot-product attention in float32 on the CPU stream, each query summed over exactly "
        "the keys it sees, in key order.");
  m.def("supported", &cpu_supported, "Whether this CPU runs the kernels (x86-64: AVX2 and FMA).");
  m.def("threads", [] { return pool().threads(); }, "Threads that share a job.");
  m.def("lanes", &lanes, "Vector lanes of every product's sums here: 16 with AVX-512, else 8.");
  m.attr("MLX_VERSION") = CSM_MLX_BUILT_WITH;
}
