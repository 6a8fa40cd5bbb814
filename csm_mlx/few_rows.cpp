// Few-row products y = x @ w.T on MLX's CPU backend, as one MLX primitive.
//
// A frame of CSM multiplies 1 to 8 rows (one per stream of the batch) by every weight matrix.
// BLAS sgemm packs the weights for such a product and computes it at a fraction of the memory
// bandwidth (MKL: 4 rows cost ~3.5x one row on one thread); here each weight row is read
// once, straight from memory, for all rows of x at a time, so 4 rows cost little more than one.
//
// Each output element is summed in the same order whatever the number of rows, the thread or
// the block that computes it: a row of a batch gets exactly the numbers it gets alone.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

constexpr int MAX_ROWS = 8;     // rows of x per pass over the weights
constexpr int64_t BLOCK = 32;   // weight rows a thread takes at a time
constexpr int64_t PREFETCH = 256;  // floats ahead in each weight row

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
bool cpu_supported() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
bool cpu_supported() {
  return true;
}
#endif

typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float sum8(v8f v) {
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

// Rows [n0, n1) of y (M, N) for x (M, K) and w (N, K); R weight rows per step.
template <int M, int R>
void rows_kernel(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t kv = K / 8 * 8;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    v8f acc[M][R] = {};
    for (int64_t k = 0; k < kv; k += 8) {
      v8f wv[R];
      for (int r = 0; r < R; r++) {
        wv[r] = load8(w + (n + r) * K + k);
        __builtin_prefetch(w + (n + r) * K + k + PREFETCH);
      }
      for (int m = 0; m < M; m++) {
        v8f xv = load8(x + m * K + k);
        for (int r = 0; r < R; r++) acc[m][r] += wv[r] * xv;
      }
    }
    for (int m = 0; m < M; m++)
      for (int r = 0; r < R; r++) {
        float s = sum8(acc[m][r]);
        for (int64_t k = kv; k < K; k++) s += x[m * K + k] * w[(n + r) * K + k];
        y[m * N + n + r] = s;
      }
  }
  if constexpr (R > 1) {
    if (n < n1) rows_kernel<M, 1>(x, w, y, K, N, n, n1);
  }
}

// Accumulators M x R stay in 16 vector registers with the weights and x.
template <int M>
void kernel(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  rows_kernel<M, (M <= 2 ? 4 : (M <= 4 ? 2 : 1))>(x, w, y, K, N, n0, n1);
}

#if defined(__x86_64__)
#pragma GCC pop_options
#endif

using Kernel = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr Kernel KERNELS[MAX_ROWS] = {kernel<1>, kernel<2>, kernel<3>, kernel<4>,
                                      kernel<5>, kernel<6>, kernel<7>, kernel<8>};

inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Threads that share the blocks of one product with the thread that runs it. Blocks are taken
// one at a time, so a thread the OS deschedules (the server's audio threads share the cores)
// delays the product by one block, not by its whole share. Idle workers spin for a short while
// (the products of a frame follow each other closely), then sleep.
//
// The job's state is one word, (job:24 | blocks:20 | next block:20), claimed by compare-and-swap:
// a worker still looking at the last job cannot take a block of the next one by mistake, and
// the job's fields are read only after a claim of it succeeded.
class Pool {
 public:
  static constexpr int64_t MAX_BLOCKS = int64_t(1) << 20;

  explicit Pool(int threads) {
    for (int i = 1; i < threads; i++) workers_.emplace_back([this] { loop(); });
  }

  int threads() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  void run(Kernel fn, const float* x, const float* w, float* y, int64_t K, int64_t N) {
    std::lock_guard<std::mutex> one_at_a_time(run_mutex_);  // CPU streams of other threads
    fn_ = fn, x_ = x, w_ = w, y_ = y, K_ = K, N_ = N;
    uint64_t blocks = static_cast<uint64_t>((N + BLOCK - 1) / BLOCK);
    job_ = (job_ + 1) & 0xFFFFFF;
    done_.store(0, std::memory_order_relaxed);
    state_.store((job_ << 40) | (blocks << 20), std::memory_order_release);
    if (!workers_.empty() && blocks > 1) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        wakes_.fetch_add(1, std::memory_order_release);
      }
      wake_.notify_all();
    }
    work();
    while (done_.load(std::memory_order_acquire) < blocks) cpu_relax();
  }

 private:
  void work() {
    uint64_t state = state_.load(std::memory_order_acquire);
    for (;;) {
      uint64_t blocks = (state >> 20) & 0xFFFFF, block = state & 0xFFFFF;
      if (block >= blocks) return;
      if (!state_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel, std::memory_order_acquire))
        continue;
      int64_t n0 = static_cast<int64_t>(block) * BLOCK;
      fn_(x_, w_, y_, K_, N_, n0, std::min(N_, n0 + BLOCK));
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
  Kernel fn_ = nullptr;
  const float* x_ = nullptr;
  const float* w_ = nullptr;
  float* y_ = nullptr;
  int64_t K_ = 0, N_ = 0;
};

int default_threads() {
  // memory bandwidth, not arithmetic, bounds these products: a few threads reach it
  unsigned n = std::thread::hardware_concurrency();
  return static_cast<int>(n == 0 ? 1 : std::min(n, 4u));
}

Pool& pool() {
  // workers are never joined: they sleep at exit, and joining them from a static destructor
  // could wait on a thread the runtime has already stopped
  static Pool* p = new Pool(default_threads());
  return *p;
}

void few_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
  for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
    int64_t rows = std::min<int64_t>(MAX_ROWS, M - m0);
    pool().run(KERNELS[rows - 1], x + m0 * K, w, y + m0 * N, K, N);
  }
}

class FewRowMatmul : public mx::UnaryPrimitive {
 public:
  explicit FewRowMatmul(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    const auto& w = inputs[1];
    if (!x.flags().row_contiguous || !w.flags().row_contiguous)
      throw std::invalid_argument("[few_row_matmul] inputs must be row-contiguous");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_output_array(out);
    encoder.dispatch([x = mx::array::unsafe_weak_copy(x), w = mx::array::unsafe_weak_copy(w),
                      out = mx::array::unsafe_weak_copy(out)]() mutable {
      few_rows(x.data<float>(), w.data<float>(), out.data<float>(), x.shape(0), x.shape(1), w.shape(0));
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[few_row_matmul] runs on the CPU only");
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
    return "FewRowMatmul";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return typeid(*this) == typeid(other);
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[1].shape(0)}};
  }
};

mx::array few_row_matmul(const mx::array& x, const mx::array& w) {
  if (x.ndim() != 2 || w.ndim() != 2 || x.shape(1) != w.shape(1))
    throw std::invalid_argument("[few_row_matmul] takes x (M, K) and w (N, K)");
  if (w.shape(0) > (Pool::MAX_BLOCKS - 1) * BLOCK)
    throw std::invalid_argument("[few_row_matmul] w has too many rows");
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32)
    throw std::invalid_argument("[few_row_matmul] takes float32 arrays");
  auto stream = mx::default_stream(mx::default_device());
  if (stream.device != mx::Device::cpu)
    throw std::invalid_argument("[few_row_matmul] runs on the CPU only");
  return mx::array({x.shape(0), w.shape(0)}, mx::float32, std::make_shared<FewRowMatmul>(stream),
                   {mx::contiguous(x, false, stream), mx::contiguous(w, false, stream)});
}

}  // namespace

NB_MODULE(_few_rows, m) {
  m.doc() = "Few-row products x @ w.T on MLX's CPU backend, bandwidth-bound for 1-8 rows.";
  m.def("few_row_matmul", &few_row_matmul, nb::arg("x"), nb::arg("w"),
        "x (M, K) @ w (N, K).T in float32 on the CPU stream, each element summed in an order "
        "independent of M.");
  m.def("supported", &cpu_supported, "Whether this CPU runs the kernel (x86-64: AVX2 and FMA).");
  m.def("threads", [] { return pool().threads(); }, "Threads that share a product.");
  m.attr("MLX_VERSION") = CSM_MLX_BUILT_WITH;
}
