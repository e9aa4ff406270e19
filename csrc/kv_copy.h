// Shared declarations for the remp KV-cache copy ops.
//
// Every op (gather_kv, scatter_kv, copy_kv) is validated on the host by the
// same code (ops.cpp) and reduced to one RowCopyPlan: for each "table"
// (kv in {K, V} x layer) and token t, copy `row_bytes` contiguous bytes from
//   src_tables[table] + src_index(t) * src_stride
// to
//   dst_tables[table] + dst_index(t) * dst_stride
// where an absent index list means the identity (index(t) = t). The CPU and
// CUDA back ends only execute plans, so validation and semantics cannot drift
// between devices.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define REMP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define REMP_HOST_DEVICE inline
#endif

namespace remp {

// A possibly-absent list of row indices (int32 or int64), read on the device
// that runs the copy. The dtype is a runtime flag (uniform per launch) so one
// kernel body serves all index dtypes.
struct IndexList {
  const void* data = nullptr;  // nullptr -> identity
  bool is_int64 = false;

  REMP_HOST_DEVICE int64_t at(int64_t t) const {
    if (data == nullptr) return t;
    return is_int64 ? static_cast<const int64_t*>(data)[t]
                    : static_cast<int64_t>(static_cast<const int32_t*>(data)[t]);
  }
};

struct RowCopyPlan {
  c10::Device device{c10::kCPU};
  int64_t num_tokens = 0;   // rows per table
  int64_t row_bytes = 0;    // bytes copied per row (num_heads * head_dim * elem)
  int64_t src_stride = 0;   // bytes between consecutive rows (slots/tokens), source
  int64_t dst_stride = 0;   // same, destination
  std::vector<uintptr_t> src_tables;  // one base address per (kv, layer)
  std::vector<uintptr_t> dst_tables;
  at::Tensor src_index;  // undefined -> identity; else contiguous int32/int64
  at::Tensor dst_index;

  int64_t num_tables() const { return static_cast<int64_t>(src_tables.size()); }
  bool empty() const { return num_tokens == 0 || row_bytes == 0 || src_tables.empty(); }
};

inline IndexList make_index_list(const at::Tensor& idx) {
  IndexList l;
  if (idx.defined()) {
    l.data = idx.data_ptr();
    l.is_int64 = idx.scalar_type() == at::kLong;
  }
  return l;
}

// Validation + planning (ops.cpp). They raise c10 errors (ValueError,
// TypeError, IndexError) with messages shared with kernels_ref.py.
RowCopyPlan plan_gather(at::TensorList k_layers, at::TensorList v_layers, const at::Tensor& slots,
                        int64_t layer_begin, int64_t layer_end, int64_t head_begin,
                        int64_t head_end, const at::Tensor& out);
RowCopyPlan plan_scatter(const at::Tensor& packed, at::TensorList k_layers,
                         at::TensorList v_layers, const at::Tensor& slots, int64_t layer_begin,
                         int64_t head_begin);
RowCopyPlan plan_copy(at::TensorList src_k, at::TensorList src_v, const at::Tensor& src_slots,
                      at::TensorList dst_k, at::TensorList dst_v, const at::Tensor& dst_slots,
                      int64_t src_layer_begin, int64_t dst_layer_begin, int64_t num_layers,
                      int64_t src_head_begin, int64_t dst_head_begin, int64_t num_heads);

// Raises unless the planned device is of the back end's type (defensive: the
// dispatcher picks the back end from the highest-priority tensor argument).
void check_backend(const RowCopyPlan& plan, c10::DeviceType expected, const char* op);

#if defined(REMP_WITH_CUDA)
void run_plan_cuda(const RowCopyPlan& plan);
// Runs the CUDA kernel body on the host, thread by thread, for CPU tensors,
// with the launch shape of a GPU with `sms` multiprocessors. Test-only: it
// lets machines without a GPU check the kernel's indexing and vector paths.
void emulate_plan_cuda(const RowCopyPlan& plan, int64_t sms);
#endif

}  // namespace remp
