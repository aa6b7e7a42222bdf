// Stride-1 "SAME" 2-D convolutions for XLA:CPU, computed by oneDNN, as XLA FFI handlers.
//
// Why: XLA:CPU lowers convolutions and their gradients to Eigen tensor contractions, which on
// AVX-512 CPUs reach ~150-176 GFLOP/s for the 64-channel 3x3 layers of DeepSR, while oneDNN's
// JIT kernels (the ones PyTorch uses) reach ~175-225. The two handlers below are the forward
// pass (bias fused) and the backward pass (input, kernel and bias gradients), so a JAX custom VJP
// can route a whole training step through them.
//
// Layouts are JAX's: activations NHWC, kernels HWIO, both float32 and dense row-major. oneDNN
// reads and writes NHWC directly; kernels are reordered to and from its blocked layout (a few
// hundred kilobytes, negligible next to the convolution). Primitives are created once per shape
// and cached; all oneDNN work runs on one thread of this library (see OneDnnThread).

#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Shape of one convolution: batch, height, width, input and output channels, kernel sides.
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

struct Plan {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  // Created on first use: inference never needs them.
  std::unique_ptr<dnnl::convolution_backward_data::primitive_desc> bwd_data_pd;
  std::unique_ptr<dnnl::convolution_backward_data> bwd_data;
  std::unique_ptr<dnnl::convolution_backward_weights::primitive_desc> bwd_weights_pd;
  std::unique_ptr<dnnl::convolution_backward_weights> bwd_weights;
};

struct Dims {
  dnnl::memory::desc src, weights_hwio, weights_any, bias, dst;
  dnnl::memory::dims strides, padding;
};

Dims MakeDims(const Key& k) {
  auto [n, h, w, ci, co, kh, kw] = k;
  Dims d;
  d.src = dnnl::memory::desc({n, ci, h, w}, dt::f32, tag::nhwc);
  d.dst = dnnl::memory::desc({n, co, h, w}, dt::f32, tag::nhwc);
  d.weights_hwio = dnnl::memory::desc({co, ci, kh, kw}, dt::f32, tag::hwio);
  d.weights_any = dnnl::memory::desc({co, ci, kh, kw}, dt::f32, tag::any);
  d.bias = dnnl::memory::desc({co}, dt::f32, tag::a);
  d.strides = {1, 1};
  d.padding = {(kh - 1) / 2, (kw - 1) / 2};
  return d;
}

std::mutex plans_mutex;
std::map<Key, std::shared_ptr<Plan>> plans;

// Scratch memory is passed in by each call (below), which makes concurrent calls safe.
dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

std::shared_ptr<Plan> GetPlan(const Key& key, bool need_backward) {
  std::lock_guard<std::mutex> lock(plans_mutex);
  auto it = plans.find(key);
  std::shared_ptr<Plan> plan;
  Dims d = MakeDims(key);
  if (it == plans.end()) {
    auto pd = dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, d.src,
        d.weights_any, d.bias, d.dst, d.strides, d.padding, d.padding, Attr());
    plan = std::make_shared<Plan>(Plan{pd, dnnl::convolution_forward(pd), nullptr, nullptr,
                                       nullptr, nullptr});
    plans.emplace(key, plan);
  } else {
    plan = it->second;
  }
  if (need_backward && !plan->bwd_data) {
    dnnl::primitive_attr attr = Attr();
    plan->bwd_data_pd = std::make_unique<dnnl::convolution_backward_data::primitive_desc>(
        Engine(), dnnl::algorithm::convolution_direct, d.src, d.weights_any, d.dst, d.strides,
        d.padding, d.padding, plan->fwd_pd, attr);
    plan->bwd_data = std::make_unique<dnnl::convolution_backward_data>(*plan->bwd_data_pd);
    plan->bwd_weights_pd = std::make_unique<dnnl::convolution_backward_weights::primitive_desc>(
        Engine(), dnnl::algorithm::convolution_direct, d.src, d.weights_any, d.bias, d.dst,
        d.strides, d.padding, d.padding, plan->fwd_pd, attr);
    plan->bwd_weights =
        std::make_unique<dnnl::convolution_backward_weights>(*plan->bwd_weights_pd);
  }
  return plan;
}

// Scratch memory for one call (oneDNN's user-mode scratchpad). Each thread keeps its buffer and
// only grows it: a fresh multi-megabyte allocation per call would be fresh pages from the kernel,
// and their page faults cost a quarter of a kernel-gradient convolution.
dnnl::memory ScratchFor(const dnnl::memory::desc& desc) {
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<char, Free> buffer;
  thread_local size_t capacity = 0;
  size_t bytes = ((desc.get_size() + 63) / 64) * 64;
  if (bytes > capacity) {
    buffer.reset(static_cast<char*>(std::aligned_alloc(64, bytes)));
    if (!buffer) throw std::bad_alloc();
    capacity = bytes;
  }
  return dnnl::memory(desc, Engine(), buffer.get());
}

// A kernel in the primitive's layout: a view of `hwio` when the layouts agree, else a copy.
dnnl::memory WeightsIn(const dnnl::memory::desc& want, dnnl::memory& hwio,
                       dnnl::stream& stream) {
  if (want == hwio.get_desc()) return hwio;
  dnnl::memory blocked(want, Engine());
  dnnl::reorder(hwio, blocked).execute(stream, hwio, blocked);
  return blocked;
}

Key KeyOf(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w) {
  return Key{x[0], x[1], x[2], x[3], w[3], w[0], w[1]};
}

ffi::Error CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w) {
  if (x.size() != 4 || w.size() != 4) {
    return ffi::Error::InvalidArgument("expected an NHWC input and an HWIO kernel");
  }
  if (w[2] != x[3]) {
    return ffi::Error::InvalidArgument("kernel input channels differ from the input's");
  }
  if (w[0] % 2 == 0 || w[1] % 2 == 0) {
    return ffi::Error::InvalidArgument("kernel sides must be odd for SAME padding");
  }
  return ffi::Error::Success();
}

// Runs every oneDNN call on one long-lived thread. oneDNN's OpenMP runtime keeps a thread team
// per calling thread; called straight from XLA's worker threads, a step ends up with two or three
// teams whose idle threads spin while another team computes, and the same train step ran
// anywhere from 7.9 to 10.0 images/s from one process to the next. From one thread there is one
// team, and XLA's calling thread sleeps until the result is ready.
class OneDnnThread {
 public:
  static OneDnnThread& Get() {
    static OneDnnThread* instance = new OneDnnThread();  // never destroyed: lives until exit
    return *instance;
  }

  ffi::Error Run(std::function<ffi::Error()> body) {
    std::packaged_task<ffi::Error()> task(std::move(body));
    std::future<ffi::Error> result = task.get_future();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      tasks_.push_back(std::move(task));
    }
    ready_.notify_one();
    return result.get();
  }

 private:
  OneDnnThread() { std::thread([this] { Loop(); }).detach(); }

  void Loop() {
    for (;;) {
      std::packaged_task<ffi::Error()> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return !tasks_.empty(); });
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::packaged_task<ffi::Error()>> tasks_;
};

// `body` on the oneDNN thread, with oneDNN's and other C++ exceptions turned into FFI errors.
template <typename F>
ffi::Error Guarded(F&& body) {
  return OneDnnThread::Get().Run([&]() {
    try {
      return body();
    } catch (const dnnl::error& e) {
      return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
    } catch (const std::exception& e) {
      return ffi::Error::Internal(e.what());
    }
  });
}

// What both directions start from: the shapes checked, then, on the oneDNN thread, the
// problem's dimensions, its cached plan (with the backward primitives when asked), a stream and
// the input and HWIO kernel as oneDNN memory, handed to `body(d, plan, stream, src, hwio)`.
template <typename F>
ffi::Error WithPlan(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w, bool backward,
                    F&& body) {
  if (auto err = CheckShapes(x.dimensions(), w.dimensions()); err.failure()) return err;
  return Guarded([&]() {
    Key key = KeyOf(x.dimensions(), w.dimensions());
    Dims d = MakeDims(key);
    auto plan = GetPlan(key, backward);
    dnnl::stream stream(Engine());
    dnnl::memory src(d.src, Engine(), x.typed_data());
    dnnl::memory hwio(d.weights_hwio, Engine(), w.typed_data());
    return body(d, plan, stream, src, hwio);
  });
}

ffi::Error ConvForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y) {
  return WithPlan(x, w, false, [&](const Dims& d, auto& plan, dnnl::stream& stream,
                                   dnnl::memory& src, dnnl::memory& hwio) {
    dnnl::memory bias(d.bias, Engine(), b.typed_data());
    dnnl::memory dst(d.dst, Engine(), y->typed_data());
    dnnl::memory weights = WeightsIn(plan->fwd_pd.weights_desc(), hwio, stream);
    dnnl::memory scratch = ScratchFor(plan->fwd_pd.scratchpad_desc());
    plan->fwd.execute(stream, {{DNNL_ARG_SRC, src},
                               {DNNL_ARG_WEIGHTS, weights},
                               {DNNL_ARG_BIAS, bias},
                               {DNNL_ARG_DST, dst},
                               {DNNL_ARG_SCRATCHPAD, scratch}});
    stream.wait();
    return ffi::Error::Success();
  });
}

// Input gradient, then kernel and bias gradients, in one call. Two separate custom calls would be
// independent in XLA's graph, and XLA:CPU runs independent thunks concurrently: two OpenMP teams
// of oneDNN then fight over the same cores, which costs more than either convolution.
ffi::Error ConvBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> dy,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                        ffi::ResultBuffer<ffi::F32> db) {
  return WithPlan(x, w, true, [&](const Dims& d, auto& plan, dnnl::stream& stream,
                                  dnnl::memory& src, dnnl::memory& hwio) {
    dnnl::memory diff_dst(d.dst, Engine(), dy.typed_data());
    dnnl::memory diff_src(d.src, Engine(), dx->typed_data());
    dnnl::memory weights = WeightsIn(plan->bwd_data_pd->weights_desc(), hwio, stream);
    plan->bwd_data->execute(
        stream, {{DNNL_ARG_DIFF_DST, diff_dst},
                 {DNNL_ARG_WEIGHTS, weights},
                 {DNNL_ARG_DIFF_SRC, diff_src},
                 {DNNL_ARG_SCRATCHPAD, ScratchFor(plan->bwd_data_pd->scratchpad_desc())}});

    dnnl::memory diff_hwio(d.weights_hwio, Engine(), dw->typed_data());
    dnnl::memory diff_bias(d.bias, Engine(), db->typed_data());
    auto want = plan->bwd_weights_pd->diff_weights_desc();
    bool direct = want == d.weights_hwio;
    dnnl::memory diff_weights = direct ? diff_hwio : dnnl::memory(want, Engine());
    plan->bwd_weights->execute(
        stream, {{DNNL_ARG_SRC, src},
                 {DNNL_ARG_DIFF_DST, diff_dst},
                 {DNNL_ARG_DIFF_WEIGHTS, diff_weights},
                 {DNNL_ARG_DIFF_BIAS, diff_bias},
                 {DNNL_ARG_SCRATCHPAD, ScratchFor(plan->bwd_weights_pd->scratchpad_desc())}});
    if (!direct) dnnl::reorder(diff_weights, diff_hwio).execute(stream, diff_weights, diff_hwio);
    stream.wait();
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PetsrConvForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PetsrConvBackward, ConvBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
