// remp KV-cache copy ops: schemas, shared validation/planning, CPU back end.
//
// The error messages here are mirrored word for word by
// remp_sglang/kernels_ref.py; keep the two in sync (tests match substrings).
#include "kv_copy.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#endif
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>

namespace remp {
namespace {

// Python spelling of dtypes so C++ and the reference raise identical text.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kFloat8_e4m3fn: return "torch.float8_e4m3fn";
    case at::kFloat8_e5m2: return "torch.float8_e5m2";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

std::string label(const char* name, size_t i) { return c10::str(name, "[", i, "]"); }

struct PoolInfo {
  int64_t num_layers = 0;
  int64_t num_slots = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  at::ScalarType dtype = at::kFloat;
  c10::Device device{c10::kCPU};
  int64_t elem = 0;
};

// All layers of a pool: non-empty, same count for K and V, 3-D, one dtype,
// one device, one shape, contiguous.
PoolInfo check_pool(const char* op, at::TensorList k, at::TensorList v, const char* kname,
                    const char* vname) {
  TORCH_CHECK_VALUE(!k.empty(), op, ": ", kname, " must be a non-empty list of tensors");
  TORCH_CHECK_VALUE(k.size() == v.size(), op, ": ", kname, " and ", vname,
                    " must have the same length, got ", k.size(), " and ", v.size());
  const at::Tensor& ref = k[0];
  const std::string ref_label = label(kname, 0);
  for (int side = 0; side < 2; ++side) {
    at::TensorList list = side == 0 ? k : v;
    const char* name = side == 0 ? kname : vname;
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& t = list[i];
      const std::string lab = label(name, i);
      TORCH_CHECK_VALUE(t.defined(), op, ": ", lab, " is undefined");
      TORCH_CHECK_VALUE(t.dim() == 3, op, ": ", lab,
                        " must be 3-D [num_slots, num_heads, head_dim], got shape ",
                        shape_str(t.sizes()));
      TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": dtype mismatch: ", lab,
                       " is ", dtype_name(t.scalar_type()), " but ", ref_label, " is ",
                       dtype_name(ref.scalar_type()));
      TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": device mismatch: ", lab, " is on ",
                        t.device().str(), " but ", ref_label, " is on ", ref.device().str());
      TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": shape mismatch: ", lab, " has shape ",
                        shape_str(t.sizes()), " but ", ref_label, " has shape ",
                        shape_str(ref.sizes()));
      TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", lab, " must be contiguous");
    }
  }
  PoolInfo p;
  p.num_layers = static_cast<int64_t>(k.size());
  p.num_slots = ref.size(0);
  p.num_heads = ref.size(1);
  p.head_dim = ref.size(2);
  p.dtype = ref.scalar_type();
  p.device = ref.device();
  p.elem = static_cast<int64_t>(ref.element_size());
  return p;
}

void check_index(const char* op, const char* name, const at::Tensor& idx, const PoolInfo& pool,
                 const char* pool_name) {
  TORCH_CHECK_VALUE(idx.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op, ": ",
                   name, " must be int32 or int64, got ", dtype_name(idx.scalar_type()));
  TORCH_CHECK_VALUE(idx.dim() == 1, op, ": ", name, " must be 1-D, got shape ",
                    shape_str(idx.sizes()));
  TORCH_CHECK_VALUE(idx.device() == pool.device, op, ": device mismatch: ", name, " is on ",
                    idx.device().str(), " but ", pool_name, "[0] is on ", pool.device.str());
}

void check_range(const char* op, const char* what, int64_t begin, int64_t end, int64_t limit,
                 const char* pool_name, const char* unit) {
  TORCH_CHECK_VALUE(0 <= begin && begin < end && end <= limit, op, ": ", what, " range [", begin,
                    ", ", end, ") is empty or out of bounds for ", pool_name, " with ", limit, " ",
                    unit);
}

// Min/max of each non-empty index list, with one device-to-host transfer.
void check_index_values(const char* op, const std::vector<const char*>& names,
                        const std::vector<at::Tensor>& idx, const std::vector<int64_t>& limits) {
  std::vector<at::Tensor> parts;
  std::vector<size_t> which;
  for (size_t i = 0; i < idx.size(); ++i) {
    if (idx[i].numel() == 0) continue;
    auto mm = at::aminmax(idx[i]);
    parts.push_back(std::get<0>(mm).reshape({1}).to(at::kLong));
    parts.push_back(std::get<1>(mm).reshape({1}).to(at::kLong));
    which.push_back(i);
  }
  if (parts.empty()) return;
  at::Tensor host = at::cat(parts).cpu();
  const int64_t* v = host.data_ptr<int64_t>();
  for (size_t j = 0; j < which.size(); ++j) {
    const size_t i = which[j];
    const int64_t lo = v[2 * j], hi = v[2 * j + 1];
    TORCH_CHECK_INDEX(lo >= 0 && hi < limits[i], op, ": ", names[i],
                      " out of range: values span [", lo, ", ", hi, "] but the pool has ",
                      limits[i], " slots");
  }
}

struct MemRange {
  uintptr_t begin;
  uintptr_t end;
  bool is_dst;
  std::string name;
};

void add_range(std::vector<MemRange>& out, const at::Tensor& t, bool is_dst, std::string name) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t n = static_cast<uintptr_t>(t.numel()) * t.element_size();
  if (n == 0) return;
  out.push_back({b, b + n, is_dst, std::move(name)});
}

// Destinations may overlap neither sources nor each other (sources may share
// memory). Stable-sort by start address (same order as kernels_ref.py); every
// overlapping pair is then found by scanning forward while the next start lies
// before the current end.
void check_no_overlap(const char* op, std::vector<MemRange> ranges) {
  std::stable_sort(ranges.begin(), ranges.end(),
            [](const MemRange& a, const MemRange& b) { return a.begin < b.begin; });
  for (size_t i = 0; i < ranges.size(); ++i) {
    for (size_t j = i + 1; j < ranges.size() && ranges[j].begin < ranges[i].end; ++j) {
      if (!ranges[i].is_dst && !ranges[j].is_dst) continue;
      const MemRange& d = ranges[i].is_dst ? ranges[i] : ranges[j];
      const MemRange& o = ranges[i].is_dst ? ranges[j] : ranges[i];
      TORCH_CHECK_VALUE(false, op, ": ", d.name, " overlaps ", o.name,
                        " in memory (destinations must not alias sources or each other)");
    }
  }
}

void add_pool_ranges(std::vector<MemRange>& out, at::TensorList k, at::TensorList v,
                     const char* kname, const char* vname, int64_t begin, int64_t count,
                     bool is_dst) {
  for (int64_t i = begin; i < begin + count; ++i) {
    add_range(out, k[i], is_dst, label(kname, i));
    add_range(out, v[i], is_dst, label(vname, i));
  }
}

uintptr_t addr(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); }

}  // namespace

RowCopyPlan plan_gather(at::TensorList k_layers, at::TensorList v_layers, const at::Tensor& slots,
                        int64_t layer_begin, int64_t layer_end, int64_t head_begin,
                        int64_t head_end, const at::Tensor& out) {
  const char* op = "gather_kv";
  const PoolInfo pool = check_pool(op, k_layers, v_layers, "k_layers", "v_layers");
  check_index(op, "slots", slots, pool, "k_layers");
  check_range(op, "layer", layer_begin, layer_end, pool.num_layers, "k_layers", "layers");
  check_range(op, "head", head_begin, head_end, pool.num_heads, "k_layers", "heads");
  const int64_t L = layer_end - layer_begin, h = head_end - head_begin, n = slots.numel();
  const int64_t D = pool.head_dim;
  TORCH_CHECK_VALUE(out.defined(), op, ": out is undefined");
  TORCH_CHECK_TYPE(out.scalar_type() == pool.dtype, op, ": dtype mismatch: out is ",
                   dtype_name(out.scalar_type()), " but k_layers[0] is ",
                   dtype_name(pool.dtype));
  TORCH_CHECK_VALUE(out.device() == pool.device, op, ": device mismatch: out is on ",
                    out.device().str(), " but k_layers[0] is on ", pool.device.str());
  const std::vector<int64_t> want{2, L, n, h, D};
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(want), op, ": out must have shape ",
                    shape_str(want), " [2, layers, tokens, heads, head_dim], got ",
                    shape_str(out.sizes()));
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  check_index_values(op, {"slots"}, {slots}, {pool.num_slots});
  std::vector<MemRange> ranges;
  add_pool_ranges(ranges, k_layers, v_layers, "k_layers", "v_layers", layer_begin, L, false);
  add_range(ranges, out, true, "out");
  check_no_overlap(op, std::move(ranges));

  RowCopyPlan p;
  p.device = pool.device;
  p.num_tokens = n;
  p.row_bytes = h * D * pool.elem;
  p.src_stride = pool.num_heads * D * pool.elem;
  p.dst_stride = p.row_bytes;
  if (n == 0) return p;
  const uintptr_t head_off = static_cast<uintptr_t>(head_begin * D * pool.elem);
  const uintptr_t out_base = addr(out);
  for (int kv = 0; kv < 2; ++kv) {
    at::TensorList layers = kv == 0 ? k_layers : v_layers;
    for (int64_t i = 0; i < L; ++i) {
      p.src_tables.push_back(addr(layers[layer_begin + i]) + head_off);
      p.dst_tables.push_back(out_base + static_cast<uintptr_t>((kv * L + i) * n * p.row_bytes));
    }
  }
  p.src_index = slots.contiguous();
  return p;
}

RowCopyPlan plan_scatter(const at::Tensor& packed, at::TensorList k_layers,
                         at::TensorList v_layers, const at::Tensor& slots, int64_t layer_begin,
                         int64_t head_begin) {
  const char* op = "scatter_kv";
  const PoolInfo pool = check_pool(op, k_layers, v_layers, "k_layers", "v_layers");
  check_index(op, "slots", slots, pool, "k_layers");
  TORCH_CHECK_VALUE(packed.defined(), op, ": packed is undefined");
  TORCH_CHECK_TYPE(packed.scalar_type() == pool.dtype, op, ": dtype mismatch: packed is ",
                   dtype_name(packed.scalar_type()), " but k_layers[0] is ",
                   dtype_name(pool.dtype));
  TORCH_CHECK_VALUE(packed.device() == pool.device, op, ": device mismatch: packed is on ",
                    packed.device().str(), " but k_layers[0] is on ", pool.device.str());
  const int64_t D = pool.head_dim;
  TORCH_CHECK_VALUE(packed.dim() == 5 && packed.size(0) == 2 && packed.size(4) == D, op,
                    ": packed must have shape [2, layers, tokens, heads, ", D, "], got ",
                    shape_str(packed.sizes()));
  TORCH_CHECK_VALUE(packed.is_contiguous(), op, ": packed must be contiguous");
  const int64_t L = packed.size(1), n = packed.size(2), h = packed.size(3);
  check_range(op, "layer", layer_begin, layer_begin + L, pool.num_layers, "k_layers", "layers");
  check_range(op, "head", head_begin, head_begin + h, pool.num_heads, "k_layers", "heads");
  TORCH_CHECK_VALUE(slots.numel() == n, op, ": slots has ", slots.numel(),
                    " entries but packed has ", n, " tokens");
  check_index_values(op, {"slots"}, {slots}, {pool.num_slots});
  std::vector<MemRange> ranges;
  add_pool_ranges(ranges, k_layers, v_layers, "k_layers", "v_layers", layer_begin, L, true);
  add_range(ranges, packed, false, "packed");
  check_no_overlap(op, std::move(ranges));

  RowCopyPlan p;
  p.device = pool.device;
  p.num_tokens = n;
  p.row_bytes = h * D * pool.elem;
  p.src_stride = p.row_bytes;
  p.dst_stride = pool.num_heads * D * pool.elem;
  if (n == 0) return p;
  const uintptr_t head_off = static_cast<uintptr_t>(head_begin * D * pool.elem);
  const uintptr_t packed_base = addr(packed);
  for (int kv = 0; kv < 2; ++kv) {
    at::TensorList layers = kv == 0 ? k_layers : v_layers;
    for (int64_t i = 0; i < L; ++i) {
      p.src_tables.push_back(packed_base +
                             static_cast<uintptr_t>((kv * L + i) * n * p.row_bytes));
      p.dst_tables.push_back(addr(layers[layer_begin + i]) + head_off);
    }
  }
  p.dst_index = slots.contiguous();
  return p;
}

RowCopyPlan plan_copy(at::TensorList src_k, at::TensorList src_v, const at::Tensor& src_slots,
                      at::TensorList dst_k, at::TensorList dst_v, const at::Tensor& dst_slots,
                      int64_t src_layer_begin, int64_t dst_layer_begin, int64_t num_layers,
                      int64_t src_head_begin, int64_t dst_head_begin, int64_t num_heads) {
  const char* op = "copy_kv";
  const PoolInfo src = check_pool(op, src_k, src_v, "src_k", "src_v");
  const PoolInfo dst = check_pool(op, dst_k, dst_v, "dst_k", "dst_v");
  TORCH_CHECK_TYPE(dst.dtype == src.dtype, op, ": dtype mismatch: dst_k[0] is ",
                   dtype_name(dst.dtype), " but src_k[0] is ", dtype_name(src.dtype));
  TORCH_CHECK_VALUE(dst.device == src.device, op, ": device mismatch: dst_k[0] is on ",
                    dst.device.str(), " but src_k[0] is on ", src.device.str());
  TORCH_CHECK_VALUE(dst.head_dim == src.head_dim, op,
                    ": head_dim mismatch: src_k[0] has head_dim ", src.head_dim,
                    " but dst_k[0] has head_dim ", dst.head_dim);
  check_index(op, "src_slots", src_slots, src, "src_k");
  check_index(op, "dst_slots", dst_slots, dst, "dst_k");
  TORCH_CHECK_VALUE(src_slots.numel() == dst_slots.numel(), op, ": src_slots has ",
                    src_slots.numel(), " entries but dst_slots has ", dst_slots.numel());
  check_range(op, "layer", src_layer_begin, src_layer_begin + num_layers, src.num_layers,
              "src_k", "layers");
  check_range(op, "layer", dst_layer_begin, dst_layer_begin + num_layers, dst.num_layers,
              "dst_k", "layers");
  check_range(op, "head", src_head_begin, src_head_begin + num_heads, src.num_heads, "src_k",
              "heads");
  check_range(op, "head", dst_head_begin, dst_head_begin + num_heads, dst.num_heads, "dst_k",
              "heads");
  check_index_values(op, {"src_slots", "dst_slots"}, {src_slots, dst_slots},
                     {src.num_slots, dst.num_slots});
  std::vector<MemRange> ranges;
  add_pool_ranges(ranges, src_k, src_v, "src_k", "src_v", src_layer_begin, num_layers, false);
  add_pool_ranges(ranges, dst_k, dst_v, "dst_k", "dst_v", dst_layer_begin, num_layers, true);
  check_no_overlap(op, std::move(ranges));

  const int64_t D = src.head_dim, n = src_slots.numel();
  RowCopyPlan p;
  p.device = src.device;
  p.num_tokens = n;
  p.row_bytes = num_heads * D * src.elem;
  p.src_stride = src.num_heads * D * src.elem;
  p.dst_stride = dst.num_heads * D * dst.elem;
  if (n == 0) return p;
  const uintptr_t src_off = static_cast<uintptr_t>(src_head_begin * D * src.elem);
  const uintptr_t dst_off = static_cast<uintptr_t>(dst_head_begin * D * dst.elem);
  for (int kv = 0; kv < 2; ++kv) {
    at::TensorList s = kv == 0 ? src_k : src_v;
    at::TensorList d = kv == 0 ? dst_k : dst_v;
    for (int64_t i = 0; i < num_layers; ++i) {
      p.src_tables.push_back(addr(s[src_layer_begin + i]) + src_off);
      p.dst_tables.push_back(addr(d[dst_layer_begin + i]) + dst_off);
    }
  }
  p.src_index = src_slots.contiguous();
  p.dst_index = dst_slots.contiguous();
  return p;
}

void check_backend(const RowCopyPlan& plan, c10::DeviceType expected, const char* op) {
  TORCH_CHECK_VALUE(plan.device.type() == expected, op, ": tensors are on ", plan.device.str(),
                    " but the ", c10::DeviceTypeName(expected, /*lower_case=*/true),
                    " kernel was selected (mixed devices?)");
}

namespace {

#if defined(__x86_64__) || defined(_M_X64)
constexpr bool kHasStreamingStores = true;
#else
constexpr bool kHasStreamingStores = false;
#endif

// Copies one row with explicit 16-byte vector moves: on x86 this beats
// memcpy for KV rows (hundreds of bytes to a few KiB), where glibc may pick
// `rep movsb`, which is slow on some CPUs (seen 2x on AMD EPYC). Streaming
// (non-temporal) stores additionally skip the read-for-ownership of
// destination lines; the caller uses them only for transfers far larger than
// the caches, with 16-byte aligned destination rows and row lengths.
template <bool kStream>
inline void copy_row(char* dst, const char* src, int64_t nbytes) {
#if defined(__x86_64__) || defined(_M_X64)
  const auto put = [](char* d, __m128i x) {
    if constexpr (kStream) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d), x);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d), x);
    }
  };
  int64_t i = 0;
  for (; i + 64 <= nbytes; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    put(dst + i, a);
    put(dst + i + 16, b);
    put(dst + i + 32, c);
    put(dst + i + 48, d);
  }
  for (; i + 16 <= nbytes; i += 16) {
    put(dst + i, _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  }
  if (i < nbytes) std::memcpy(dst + i, src + i, static_cast<size_t>(nbytes - i));
#else
  std::memcpy(dst, src, static_cast<size_t>(nbytes));
#endif
}

// The one CPU kernel body: rows (table, token) in table-major order, each a
// copy of row_bytes, split across threads by at::parallel_for with >= 64 KiB
// per task.
template <bool kStream>
void copy_rows_cpu(const RowCopyPlan& p) {
  const int64_t n = p.num_tokens;
  const int64_t total = n * p.num_tables();
  const int64_t rb = p.row_bytes, ss = p.src_stride, ds = p.dst_stride;
  const IndexList si = make_index_list(p.src_index);
  const IndexList di = make_index_list(p.dst_index);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / rb);
  constexpr int64_t kPrefetchRows = 2;
  const bool gathered_src = si.data != nullptr;
  const int64_t prefetch_bytes = std::min<int64_t>(rb, 4096);
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    int64_t table = begin / n;
    int64_t t = begin - table * n;
    while (begin < end) {
      const char* sb = reinterpret_cast<const char*>(p.src_tables[table]);
      char* db = reinterpret_cast<char*>(p.dst_tables[table]);
      const int64_t stop = std::min<int64_t>(n, t + (end - begin));
      for (; t < stop; ++t, ++begin) {
        if (gathered_src && t + kPrefetchRows < stop) {
          // Random source rows defeat the hardware prefetcher at row starts.
          const char* next = sb + si.at(t + kPrefetchRows) * ss;
          for (int64_t off = 0; off < prefetch_bytes; off += 64) __builtin_prefetch(next + off);
        }
        copy_row<kStream>(db + di.at(t) * ds, sb + si.at(t) * ss, rb);
      }
      t = 0;
      ++table;
    }
#if defined(__x86_64__) || defined(_M_X64)
    if constexpr (kStream) _mm_sfence();  // order streaming stores before returning
#endif
  });
}

// Streaming stores pay off only when the destination would not stay cached.
constexpr int64_t kStreamMinBytes = int64_t{8} << 20;

// Test hook: > 0 makes the CPU back end run plans through the CUDA kernel
// body on the host (emulate_plan_cuda) with that many SMs.
std::atomic<int64_t> g_emulate_cuda_sms{0};

// REMP_CPU_STREAM=0 / 1 forces streaming stores off / on (when alignment
// allows); unset = on for transfers of at least kStreamMinBytes.
int stream_mode() {
  static const int mode = [] {
    const char* env = std::getenv("REMP_CPU_STREAM");
    if (env == nullptr || *env == '\0') return -1;
    return std::atoi(env) != 0 ? 1 : 0;
  }();
  return mode;
}

void run_plan_cpu(const RowCopyPlan& p) {
  if (p.empty()) return;
#if defined(REMP_WITH_CUDA)
  if (const int64_t sms = g_emulate_cuda_sms.load(std::memory_order_relaxed); sms > 0) {
    emulate_plan_cuda(p, sms);
    return;
  }
#endif
  const int mode = stream_mode();
  const bool big = p.row_bytes * p.num_tokens * p.num_tables() >= kStreamMinBytes;
  bool stream = kHasStreamingStores && p.row_bytes % 16 == 0 && p.dst_stride % 16 == 0 &&
                (mode == 1 || (mode == -1 && big));
  for (uintptr_t d : p.dst_tables) stream = stream && d % 16 == 0;
  if (stream) {
    copy_rows_cpu<true>(p);
  } else {
    copy_rows_cpu<false>(p);
  }
}

void gather_kv_cpu(at::TensorList k_layers, at::TensorList v_layers, const at::Tensor& slots,
                   int64_t layer_begin, int64_t layer_end, int64_t head_begin, int64_t head_end,
                   const at::Tensor& out) {
  RowCopyPlan p = plan_gather(k_layers, v_layers, slots, layer_begin, layer_end, head_begin,
                              head_end, out);
  check_backend(p, c10::kCPU, "gather_kv");
  run_plan_cpu(p);
}

void scatter_kv_cpu(const at::Tensor& packed, at::TensorList k_layers, at::TensorList v_layers,
                    const at::Tensor& slots, int64_t layer_begin, int64_t head_begin) {
  RowCopyPlan p = plan_scatter(packed, k_layers, v_layers, slots, layer_begin, head_begin);
  check_backend(p, c10::kCPU, "scatter_kv");
  run_plan_cpu(p);
}

void copy_kv_cpu(at::TensorList src_k, at::TensorList src_v, const at::Tensor& src_slots,
                 at::TensorList dst_k, at::TensorList dst_v, const at::Tensor& dst_slots,
                 int64_t src_layer_begin, int64_t dst_layer_begin, int64_t num_layers,
                 int64_t src_head_begin, int64_t dst_head_begin, int64_t num_heads) {
  RowCopyPlan p = plan_copy(src_k, src_v, src_slots, dst_k, dst_v, dst_slots, src_layer_begin,
                            dst_layer_begin, num_layers, src_head_begin, dst_head_begin,
                            num_heads);
  check_backend(p, c10::kCPU, "copy_kv");
  run_plan_cpu(p);
}

#if defined(REMP_WITH_CUDA)
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

bool with_cuda() { return kWithCuda; }

int64_t set_cuda_emulation(int64_t sms) {
  TORCH_CHECK(kWithCuda, "remp: _set_cuda_emulation needs an extension built with CUDA");
  TORCH_CHECK_VALUE(sms >= 0, "remp: _set_cuda_emulation needs sms >= 0");
  return g_emulate_cuda_sms.exchange(sms);
}

}  // namespace

#if defined(REMP_WITH_CUDA)
std::string cuda_build_info();  // kv_copy_cuda.cu
#endif

namespace {
std::string build_info() {
  std::string s = c10::str("remp._C cpu=1 cuda=", kWithCuda ? 1 : 0);
#if defined(REMP_WITH_CUDA)
  s += " " + cuda_build_info();
#endif
  return s;
}
}  // namespace

}  // namespace remp

// Ops (layouts: pools are per-layer contiguous [slots, heads, head_dim] K and
// V tensors; packed is contiguous [2 (K, V), layers, tokens, heads, head_dim]):
//   gather_kv : out[kv, i, t, j] = pool_kv[layer_begin + i][slots[t], head_begin + j]
//   scatter_kv: pool_kv[layer_begin + i][slots[t], head_begin + j] = packed[kv, i, t, j]
//   copy_kv   : dst_kv[dst_layer_begin + i][dst_slots[t], dst_head_begin + j] =
//               src_kv[src_layer_begin + i][src_slots[t], src_head_begin + j]
// Repeated source slots are fine; repeated destination slots are undefined
// behaviour (one of the writes wins, which one is unspecified). Destinations
// must not overlap sources or each other in memory (checked).
TORCH_LIBRARY(remp, m) {
  m.def(
      "gather_kv(Tensor[] k_layers, Tensor[] v_layers, Tensor slots, int layer_begin, "
      "int layer_end, int head_begin, int head_end, Tensor(a!) out) -> ()");
  m.def(
      "scatter_kv(Tensor packed, Tensor(a!)[] k_layers, Tensor(b!)[] v_layers, Tensor slots, "
      "int layer_begin, int head_begin) -> ()");
  m.def(
      "copy_kv(Tensor[] src_k, Tensor[] src_v, Tensor src_slots, Tensor(a!)[] dst_k, "
      "Tensor(b!)[] dst_v, Tensor dst_slots, int src_layer_begin, int dst_layer_begin, "
      "int num_layers, int src_head_begin, int dst_head_begin, int num_heads) -> ()");
  m.def("with_cuda() -> bool", &remp::with_cuda);
  m.def("build_info() -> str", &remp::build_info);
  // Test-only: run CPU-tensor ops through the CUDA kernel body on the host
  // (sms > 0 = emulated SM count, 0 = off). Returns the previous setting.
  m.def("_set_cuda_emulation(int sms) -> int", &remp::set_cuda_emulation);
}

TORCH_LIBRARY_IMPL(remp, CPU, m) {
  m.impl("gather_kv", &remp::gather_kv_cpu);
  m.impl("scatter_kv", &remp::scatter_kv_cpu);
  m.impl("copy_kv", &remp::copy_kv_cpu);
}
