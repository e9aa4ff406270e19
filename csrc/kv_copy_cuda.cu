// CUDA back end for the remp KV-cache copy ops.
//
// One launch per op covers all layers, K and V: blockIdx.y selects the
// (kv, layer) table entry, a group of TX threads copies one row (token) with
// the widest vector (16/8/4/2/1 bytes) that every row start, stride and row
// length allows, and each group keeps U rows in flight so enough loads are
// outstanding to saturate HBM. Pointer tables travel in the kernel parameters
// (up to kMaxInline entries per side) or, for deeper models, in a small device
// buffer uploaded from pinned memory on the current stream.
#include "kv_copy.h"

// Only c10/cuda headers: ATen/cuda/CUDAContext.h drags in cuBLAS/cuSPARSE headers
// that a minimal CUDA toolkit (nvcc + cudart) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace remp {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;        // rows in flight per thread group
constexpr int kMaxInline = 128;   // table entries per side passed by value (64 layers)

struct KernelArgs {
  const uintptr_t* src_table;  // device table or nullptr -> src_inline
  const uintptr_t* dst_table;
  IndexList src_idx;
  IndexList dst_idx;
  int64_t n;           // rows (tokens) per table
  int64_t src_stride;  // bytes
  int64_t dst_stride;  // bytes
  int32_t vecs_per_row;
  int32_t tx_log2;     // threads per row = 1 << tx_log2
  uintptr_t src_inline[kMaxInline];
  uintptr_t dst_inline[kMaxInline];
};

template <typename V>
__host__ __device__ __forceinline__ V load_ro(const V* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);  // ld.global.nc: sources are never written by the launch (overlap rejected)
#else
  return *p;  // host emulation (emulate_plan_cuda)
#endif
}

template <typename V>
__host__ __device__ __forceinline__ void store(V* p, const V& v) {
#if defined(__CUDA_ARCH__)
  // Pointers from the tables are untyped addresses; telling the compiler they
  // are global turns generic ST into plain (weak) STG.
  __builtin_assume(__isGlobal(p));
#endif
  *p = v;
}

// The one kernel body, written per thread so the host emulator runs exactly
// the code the GPU runs. Thread (block bx, by; thread tid) copies, for table
// `by`, tokens g, g + S, g + 2S, ... (g = its row-group, S = grid-wide
// row-groups), U tokens per iteration so U independent loads are in flight,
// each row as vecs_per_row vectors strided by the TX lanes of its group.
template <typename V>
__host__ __device__ __forceinline__ void row_copy_thread(const KernelArgs& a, int64_t bx,
                                                         int64_t by, int tid, int64_t grid_x) {
  const char* src_base =
      reinterpret_cast<const char*>(a.src_table ? a.src_table[by] : a.src_inline[by]);
  char* dst_base = reinterpret_cast<char*>(a.dst_table ? a.dst_table[by] : a.dst_inline[by]);
  const int tx_n = 1 << a.tx_log2;
  const int tx = tid & (tx_n - 1);
  const int ty = tid >> a.tx_log2;
  const int64_t rows_per_block = kThreads >> a.tx_log2;
  const int64_t stride = grid_x * rows_per_block;
  const int32_t vpr = a.vecs_per_row;

  for (int64_t t0 = bx * rows_per_block + ty; t0 < a.n; t0 += stride * kUnroll) {
    const V* src[kUnroll];
    V* dst[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = t0 + u * stride;
      if (t < a.n) {
        src[u] = reinterpret_cast<const V*>(src_base + a.src_idx.at(t) * a.src_stride);
        dst[u] = reinterpret_cast<V*>(dst_base + a.dst_idx.at(t) * a.dst_stride);
      } else {
        src[u] = nullptr;
        dst[u] = nullptr;
      }
    }
    for (int32_t j = tx; j < vpr; j += tx_n) {
      V r[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (src[u] != nullptr) r[u] = load_ro(src[u] + j);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (dst[u] != nullptr) store(dst[u] + j, r[u]);
      }
    }
  }
}

template <typename V>
__global__ void __launch_bounds__(kThreads) kv_row_copy_kernel(const KernelArgs a) {
  row_copy_thread<V>(a, blockIdx.x, blockIdx.y, threadIdx.x, gridDim.x);
}

// Widest vector (16/8/4/2/1 bytes) dividing every row start and row length.
// Row starts are base + index * stride, so aligned bases and strides suffice.
int vector_bytes(const RowCopyPlan& p) {
  uintptr_t bits = static_cast<uintptr_t>(p.row_bytes) | static_cast<uintptr_t>(p.src_stride) |
                   static_cast<uintptr_t>(p.dst_stride);
  for (uintptr_t x : p.src_tables) bits |= x;
  for (uintptr_t x : p.dst_tables) bits |= x;
  for (int v = 16; v > 1; v >>= 1) {
    if ((bits & static_cast<uintptr_t>(v - 1)) == 0) return v;
  }
  return 1;
}

struct LaunchShape {
  int tx_log2 = 0;
  int64_t grid_x = 1;
  int64_t grid_y = 1;
};

// Threads per row: a warp (fewer lanes for short rows), widened up to a whole
// block when there are too few rows to occupy the GPU. Grid: one y-slice per
// table, x sized so the grid is one resident wave (the grid-stride loop does
// the rest).
LaunchShape launch_shape(const RowCopyPlan& p, int64_t vpr, int64_t sms, int64_t blocks_per_sm) {
  LaunchShape s;
  const int64_t tables = p.num_tables();
  while ((int64_t{1} << s.tx_log2) < std::min<int64_t>(vpr, 32)) ++s.tx_log2;
  const int64_t groups_needed = tables * ((p.num_tokens + kUnroll - 1) / kUnroll);
  blocks_per_sm = std::max<int64_t>(blocks_per_sm, 1);
  const int64_t thread_slots = sms * blocks_per_sm * kThreads;
  while ((int64_t{1} << s.tx_log2) < kThreads && (int64_t{1} << s.tx_log2) < vpr &&
         groups_needed * (int64_t{1} << s.tx_log2) < thread_slots) {
    ++s.tx_log2;
  }
  const int64_t rows_per_block = kThreads >> s.tx_log2;
  const int64_t want_x = (p.num_tokens + rows_per_block * kUnroll - 1) / (rows_per_block * kUnroll);
  // Exactly one resident wave (rounded down): every block gets the same share
  // of rows, so there is no tail wave of a few blocks.
  const int64_t resident = sms * blocks_per_sm;
  const int64_t cap_x = std::max<int64_t>(1, resident / tables);
  s.grid_x = std::max<int64_t>(1, std::min<int64_t>(want_x, cap_x));
  s.grid_y = tables;
  return s;
}

// Kernel arguments for a plan; tables beyond kMaxInline entries go through
// `table_storage` (device memory for a launch, host memory for emulation).
KernelArgs make_args(const RowCopyPlan& p, int vec, const uintptr_t* table_storage) {
  KernelArgs a{};
  a.src_idx = make_index_list(p.src_index);
  a.dst_idx = make_index_list(p.dst_index);
  a.n = p.num_tokens;
  a.src_stride = p.src_stride;
  a.dst_stride = p.dst_stride;
  a.vecs_per_row = static_cast<int32_t>(p.row_bytes / vec);
  const int64_t tables = p.num_tables();
  if (table_storage == nullptr) {
    std::copy(p.src_tables.begin(), p.src_tables.end(), a.src_inline);
    std::copy(p.dst_tables.begin(), p.dst_tables.end(), a.dst_inline);
  } else {
    a.src_table = table_storage;
    a.dst_table = table_storage + tables;
  }
  return a;
}

template <typename V>
void launch(const RowCopyPlan& p, KernelArgs a, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  static const int blocks_per_sm = [] {
    int b = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kv_row_copy_kernel<V>, kThreads, 0));
    return std::max(b, 1);
  }();
  const LaunchShape s = launch_shape(p, a.vecs_per_row, sms, blocks_per_sm);
  a.tx_log2 = s.tx_log2;
  const dim3 grid(static_cast<unsigned>(s.grid_x), static_cast<unsigned>(s.grid_y));
  kv_row_copy_kernel<V><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream(device)>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename V>
void emulate(const RowCopyPlan& p, KernelArgs a, int64_t sms) {
  // 4 resident blocks per SM, as ptxas' register count gives the 16-byte
  // kernel on sm_90; `sms` varies the grid.
  const LaunchShape s = launch_shape(p, a.vecs_per_row, sms, 4);
  a.tx_log2 = s.tx_log2;
  for (int64_t by = 0; by < s.grid_y; ++by) {
    for (int64_t bx = 0; bx < s.grid_x; ++bx) {
      for (int tid = 0; tid < kThreads; ++tid) row_copy_thread<V>(a, bx, by, tid, s.grid_x);
    }
  }
}

template <template <typename> class Fn, typename... Args>
void dispatch_vec(int vec, Args&&... args) {
  switch (vec) {
    case 16: Fn<uint4>::run(std::forward<Args>(args)...); break;
    case 8: Fn<uint2>::run(std::forward<Args>(args)...); break;
    case 4: Fn<unsigned int>::run(std::forward<Args>(args)...); break;
    case 2: Fn<unsigned short>::run(std::forward<Args>(args)...); break;
    default: Fn<unsigned char>::run(std::forward<Args>(args)...); break;
  }
}

template <typename V>
struct Launch {
  static void run(const RowCopyPlan& p, const KernelArgs& a, int device) {
    launch<V>(p, a, device);
  }
};

template <typename V>
struct Emulate {
  static void run(const RowCopyPlan& p, const KernelArgs& a, int64_t sms) {
    emulate<V>(p, a, sms);
  }
};

void check_plan_limits(const RowCopyPlan& p) {
  TORCH_CHECK_VALUE(p.num_tables() <= 65535, "remp: too many layers for one launch (",
                    p.num_tables() / 2, " > 32767)");
  TORCH_CHECK_VALUE(p.row_bytes < (int64_t{1} << 31), "remp: rows over 2 GiB are not supported");
}

}  // namespace

void run_plan_cuda(const RowCopyPlan& p) {
  if (p.empty()) return;
  check_plan_limits(p);
  const c10::cuda::CUDAGuard guard(p.device);
  const int device = p.device.index();
  const int vec = vector_bytes(p);
  const int64_t tables = p.num_tables();
  at::Tensor dev_tables;  // freed after the launch: the allocator orders reuse on this stream
  const uintptr_t* storage = nullptr;
  if (tables > kMaxInline) {
    const auto opts = at::TensorOptions().dtype(at::kLong);
    at::Tensor host = at::empty({2 * tables}, opts.pinned_memory(true));
    auto* h = reinterpret_cast<uintptr_t*>(host.data_ptr<int64_t>());
    std::copy(p.src_tables.begin(), p.src_tables.end(), h);
    std::copy(p.dst_tables.begin(), p.dst_tables.end(), h + tables);
    dev_tables = at::empty({2 * tables}, opts.device(p.device));
    dev_tables.copy_(host, /*non_blocking=*/true);  // pinned source stays alive until copied
    storage = reinterpret_cast<const uintptr_t*>(dev_tables.data_ptr<int64_t>());
  }
  dispatch_vec<Launch>(vec, p, make_args(p, vec, storage), device);
}

void emulate_plan_cuda(const RowCopyPlan& p, int64_t sms) {
  if (p.empty()) return;
  check_plan_limits(p);
  TORCH_CHECK_VALUE(p.device.is_cpu(), "remp: CUDA kernel emulation runs on CPU tensors");
  const int vec = vector_bytes(p);
  std::vector<uintptr_t> host_tables;
  const uintptr_t* storage = nullptr;
  if (p.num_tables() > kMaxInline) {
    host_tables = p.src_tables;
    host_tables.insert(host_tables.end(), p.dst_tables.begin(), p.dst_tables.end());
    storage = host_tables.data();
  }
  dispatch_vec<Emulate>(vec, p, make_args(p, vec, storage), sms);
}

#define REMP_STR2(...) #__VA_ARGS__
#define REMP_STR(...) REMP_STR2(__VA_ARGS__)

std::string cuda_build_info() {
  std::string s = "cuda_runtime=" REMP_STR(CUDART_VERSION);
#if defined(__CUDA_ARCH_LIST__)
  s += " cuda_archs=" REMP_STR(__CUDA_ARCH_LIST__);
#endif
  return s;
}

namespace {

void gather_kv_cuda(at::TensorList k_layers, at::TensorList v_layers, const at::Tensor& slots,
                    int64_t layer_begin, int64_t layer_end, int64_t head_begin, int64_t head_end,
                    const at::Tensor& out) {
  RowCopyPlan p = plan_gather(k_layers, v_layers, slots, layer_begin, layer_end, head_begin,
                              head_end, out);
  check_backend(p, c10::kCUDA, "gather_kv");
  run_plan_cuda(p);
}

void scatter_kv_cuda(const at::Tensor& packed, at::TensorList k_layers, at::TensorList v_layers,
                     const at::Tensor& slots, int64_t layer_begin, int64_t head_begin) {
  RowCopyPlan p = plan_scatter(packed, k_layers, v_layers, slots, layer_begin, head_begin);
  check_backend(p, c10::kCUDA, "scatter_kv");
  run_plan_cuda(p);
}

void copy_kv_cuda(at::TensorList src_k, at::TensorList src_v, const at::Tensor& src_slots,
                  at::TensorList dst_k, at::TensorList dst_v, const at::Tensor& dst_slots,
                  int64_t src_layer_begin, int64_t dst_layer_begin, int64_t num_layers,
                  int64_t src_head_begin, int64_t dst_head_begin, int64_t num_heads) {
  RowCopyPlan p = plan_copy(src_k, src_v, src_slots, dst_k, dst_v, dst_slots, src_layer_begin,
                            dst_layer_begin, num_layers, src_head_begin, dst_head_begin,
                            num_heads);
  check_backend(p, c10::kCUDA, "copy_kv");
  run_plan_cuda(p);
}

}  // namespace
}  // namespace remp

TORCH_LIBRARY_IMPL(remp, CUDA, m) {
  m.impl("gather_kv", &remp::gather_kv_cuda);
  m.impl("scatter_kv", &remp::scatter_kv_cuda);
  m.impl("copy_kv", &remp::copy_kv_cuda);
}
