// ONNX Runtime registration of the ai.tardis custom-op domain.
//
// Exported symbol: RegisterCustomOps(OrtSessionOptions*, const OrtApiBase*). Registers
// ai.tardis::FfnFallback (version 1; inputs x, y_folded, z_hat?, w1t?, b1, w2, lines, predictor_v?,
// row_scales?) for float and float16 on the CPU execution provider and, when built with USE_CUDA, on
// the CUDA execution provider; with int8 rows (w1t and w2 int8, row_scales given) on the CPU only, so
// that ONNX Runtime places such a node on the CPU in a CUDA session. The kernels themselves live in
// ffn_fallback_cpu.cc and ffn_fallback_cuda.cu; this file only reads attributes, checks shapes
// and hands pointers over.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "ffn_fallback.h"

#define TARDIS_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr const char* kDomain = "ai.tardis";
constexpr const char* kFfnFallback = "FfnFallback";
constexpr const char* kCudaProvider = "CUDAExecutionProvider";

enum class Device { kCpu, kCuda };

// Compute-side element type for each ONNX element type (half travels as its uint16_t bits).
template <typename T>
struct Element;
template <>
struct Element<float> {
  using Compute = float;
  static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
};
template <>
struct Element<Ort::Float16_t> {
  using Compute = uint16_t;
  static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
};

struct Attributes {
  float margin = 0.0f;
  int approximate = 0;  // 0: "none" (erf GELU), 1: "tanh"
};

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t k = 0; k < shape.size(); ++k) out << (k ? ", " : "") << shape[k];
  out << ']';
  return out.str();
}

// Reads the optional attributes; an unknown `approximate` value is an error.
OrtStatusPtr read_attributes(const OrtApi& api, const OrtKernelInfo* info, Attributes* out) {
  float margin = 0.0f;
  if (OrtStatus* status = api.KernelInfoGetAttribute_float(info, "margin", &margin)) {
    api.ReleaseStatus(status);  // absent: default 0
    margin = 0.0f;
  }
  out->margin = margin;

  size_t size = 0;
  std::string approximate = "none";
  if (OrtStatus* status = api.KernelInfoGetAttribute_string(info, "approximate", nullptr, &size)) {
    api.ReleaseStatus(status);  // absent: default "none"
  } else {
    std::string value(size, '\0');
    if (OrtStatus* status2 = api.KernelInfoGetAttribute_string(info, "approximate", value.data(), &size)) {
      return status2;
    }
    value.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
    approximate = value;
  }
  if (approximate == "none") {
    out->approximate = 0;
  } else if (approximate == "tanh") {
    out->approximate = 1;
  } else {
    const std::string message = std::string("ai.tardis::FfnFallback: attribute approximate must be 'none' or 'tanh', got '") +
                                approximate + "'";
    return api.CreateStatus(ORT_INVALID_ARGUMENT, message.c_str());
  }
  return nullptr;
}

// Inputs; z_hat (2) and predictor_v (7) are optional and exactly one of them is given; w1t (3) is
// optional with z_hat (absent: the residual is computed from z = z_hat + b1, no W1 row is read);
// row_scales (8, [2, h] float32) is given exactly when w1t and w2 are int8 rows.
constexpr size_t kInputs = 9;
constexpr size_t kZHat = 2, kW1t = 3, kW2 = 5, kLines = 6, kPredictorV = 7, kRowScales = 8;

// Checks the input shapes against each other (an absent input has no shape); returns "" when
// they agree, else a message.
std::string check_shapes(const std::vector<std::vector<int64_t>>& s, const std::vector<bool>& given, bool int8_rows,
                         int64_t* tokens, int64_t* d, int64_t* h, int64_t* rank) {
  const auto& x = s[0];
  if (x.empty()) return "x must have at least one dimension, got a scalar";
  if (given[kZHat] == given[kPredictorV]) return "give exactly one of z_hat and predictor_v";
  if (!given[kW1t] && !given[kZHat]) return "w1t may be left out only with z_hat (the residual is then taken from it)";
  *d = x.back();
  if (given[kZHat]) {
    const auto& z_hat = s[kZHat];
    if (s[1] != x) return "y_folded shape " + shape_string(s[1]) + " differs from x shape " + shape_string(x);
    if (z_hat.size() != x.size() || !std::equal(x.begin(), x.end() - 1, z_hat.begin())) {
      return "z_hat shape " + shape_string(z_hat) + " must be x's leading dims plus [h]; x is " + shape_string(x);
    }
    *h = z_hat.back();
    *rank = 0;
  } else {
    const auto& v = s[kPredictorV];
    if (v.size() != 2) return "predictor_v shape " + shape_string(v) + " must be [rank, h]";
    *rank = v[0];
    *h = v[1];
    std::vector<int64_t> folded = x;
    folded.back() += *rank;
    if (s[1] != folded) {
      return "y_folded shape " + shape_string(s[1]) + " must be x's shape plus rank columns (the code x·U) = " +
             shape_string(folded);
    }
  }
  *tokens = 1;
  for (size_t k = 0; k + 1 < x.size(); ++k) *tokens *= x[k];
  const std::vector<int64_t> hd{*h, *d}, hh{*h}, lines{4, *h};
  if (given[kRowScales] != int8_rows) return "row_scales must be given exactly when w1t and w2 are int8 rows";
  const std::vector<int64_t> scales{2, *h};
  if (int8_rows && s[kRowScales] != scales) {
    return "row_scales shape " + shape_string(s[kRowScales]) + " must be [2, h] = " + shape_string(scales);
  }
  if (given[kW1t] && s[3] != hd) return "w1t shape " + shape_string(s[3]) + " must be [h, d] = " + shape_string(hd);
  if (s[4] != hh) return "b1 shape " + shape_string(s[4]) + " must be [h] = " + shape_string(hh);
  if (s[5] != hd) return "w2 shape " + shape_string(s[5]) + " must be [h, d] = " + shape_string(hd);
  if (s[kLines] != lines) return "lines shape " + shape_string(s[kLines]) + " must be [4, h] = " + shape_string(lines);
  return "";
}

#ifdef USE_CUDA
void release_allocator(OrtAllocator* allocator) { Ort::GetApi().ReleaseAllocator(allocator); }
#endif

void run_parallel(void* context, void (*fn)(void*, size_t), size_t total, void* data) {
  Ort::KernelContext(static_cast<OrtKernelContext*>(context)).ParallelFor(fn, total, 0, data);
}

// T: the element type of x, y_folded, z_hat, b1, predictor_v and y; kInt8Rows: w1t and w2 are int8 rows
// scaled by row_scales, else T.
template <typename T, Device kDevice, bool kInt8Rows = false>
struct FfnFallbackKernel {
  const OrtApi& api;
  Attributes attributes;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      return compute(context);
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
    }
  }

  OrtStatusPtr compute(OrtKernelContext* raw_context) {
    using C = typename Element<T>::Compute;
    Ort::KernelContext context(raw_context);
    std::vector<Ort::ConstValue> inputs(kInputs, Ort::ConstValue{nullptr});
    std::vector<std::vector<int64_t>> shapes(kInputs);
    std::vector<bool> given(kInputs, false);
    for (size_t k = 0; k < std::min(kInputs, context.GetInputCount()); ++k) {
      inputs[k] = context.GetInput(k);
      given[k] = static_cast<const OrtValue*>(inputs[k]) != nullptr;
      if (given[k]) shapes[k] = inputs[k].GetTensorTypeAndShapeInfo().GetShape();
    }
    int64_t tokens = 0, d = 0, h = 0, rank = 0;
    const std::string problem = check_shapes(shapes, given, kInt8Rows, &tokens, &d, &h, &rank);
    if (!problem.empty()) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, ("ai.tardis::FfnFallback: " + problem).c_str());
    }
    auto output = context.GetOutput(0, shapes[0]);
    if (tokens == 0 || d == 0) return nullptr;

    const auto data = [&](size_t k) {
      return given[k] ? reinterpret_cast<const C*>(inputs[k].GetTensorRawData()) : nullptr;
    };
    const auto rows = [&](size_t k) { return kInt8Rows ? nullptr : data(k); };
    tardis::FallbackArgs<C> args{data(0),
                                 data(1),
                                 data(2),
                                 rows(kW1t),
                                 data(4),
                                 rows(kW2),
                                 inputs[6].GetTensorData<float>(),
                                 reinterpret_cast<C*>(output.GetTensorMutableRawData()),
                                 tokens,
                                 d,
                                 h,
                                 attributes.margin,
                                 attributes.approximate,
                                 data(kPredictorV),
                                 rank,
                                 d + rank};
    if constexpr (kInt8Rows) {
      const auto int8_data = [&](size_t k) {
        return given[k] ? static_cast<const int8_t*>(inputs[k].GetTensorRawData()) : nullptr;
      };
      args.w1t_q = int8_data(kW1t);
      args.w2_q = int8_data(kW2);
      args.row_scales = inputs[kRowScales].GetTensorData<float>();
    }
    if constexpr (kDevice == Device::kCpu) {
      tardis::ffn_fallback_cpu(args, tardis::ParallelRunner{run_parallel, raw_context});
    } else {
#ifdef USE_CUDA
      // Scratch from the session's arena for this device (stream-ordered on the compute stream).
      OrtAllocator* allocator = nullptr;
      Ort::ThrowOnError(api.KernelContext_GetAllocator(raw_context, inputs[0].GetTensorMemoryInfo(), &allocator));
      const std::unique_ptr<OrtAllocator, void (*)(OrtAllocator*)> release(allocator, release_allocator);
      const tardis::DeviceScratch scratch{
          [](void* a, size_t bytes) { return static_cast<OrtAllocator*>(a)->Alloc(static_cast<OrtAllocator*>(a), bytes); },
          [](void* a, void* p) { static_cast<OrtAllocator*>(a)->Free(static_cast<OrtAllocator*>(a), p); }, allocator};
      if (const char* error = tardis::ffn_fallback_cuda(args, context.GetGPUComputeStream(), scratch)) {
        return api.CreateStatus(ORT_RUNTIME_EXCEPTION, (std::string("ai.tardis::FfnFallback (CUDA): ") + error).c_str());
      }
#endif
    }
    return nullptr;
  }
};

template <typename T, Device kDevice, bool kInt8Rows = false>
struct FfnFallbackOp
    : Ort::CustomOpBase<FfnFallbackOp<T, kDevice, kInt8Rows>, FfnFallbackKernel<T, kDevice, kInt8Rows>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    Attributes attributes;
    if (OrtStatusPtr status = read_attributes(api, info, &attributes)) return status;
    if constexpr (kDevice == Device::kCpu) {
      // The rows the fallback reads scattered: W1ᵀ and W2, when they are initializers.
      for (size_t k : {kW1t, kW2}) {
        int is_constant = 0;
        const OrtValue* value = nullptr;
        if (OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, k, &is_constant, &value)) {
          api.ReleaseStatus(status);
          continue;
        }
        if (is_constant == 0 || value == nullptr) continue;
        const Ort::ConstValue tensor(value);
        const size_t element = kInt8Rows ? 1 : sizeof(typename Element<T>::Compute);
        const size_t bytes = tensor.GetTensorTypeAndShapeInfo().GetElementCount() * element;
        tardis::back_with_huge_pages(tensor.GetTensorRawData(), bytes);
      }
    }
    *kernel = new FfnFallbackKernel<T, kDevice, kInt8Rows>{api, attributes};
    return nullptr;
  }

  const char* GetName() const { return kFfnFallback; }
  const char* GetExecutionProviderType() const { return kDevice == Device::kCuda ? kCudaProvider : nullptr; }

  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    if (index == kLines || index == kRowScales) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // always float32
    if (kInt8Rows && (index == kW1t || index == kW2)) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    return Element<T>::kType;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    const bool optional = index == kZHat || index == kW1t || index == kPredictorV || index == kRowScales;
    return optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return Element<T>::kType; }
};

// Domains handed to sessions must outlive them; keep one per registration until unload.
std::mutex domains_mutex;
std::vector<std::unique_ptr<OrtCustomOpDomain, void (*)(OrtCustomOpDomain*)>>& domains() {
  static std::vector<std::unique_ptr<OrtCustomOpDomain, void (*)(OrtCustomOpDomain*)>> all;
  return all;
}

OrtStatusPtr register_domain(const OrtApi& api, OrtSessionOptions* options) {
  static const FfnFallbackOp<float, Device::kCpu> cpu_f32;
  static const FfnFallbackOp<Ort::Float16_t, Device::kCpu> cpu_f16;
  static const FfnFallbackOp<float, Device::kCpu, true> cpu_f32_int8_rows;
  static const FfnFallbackOp<Ort::Float16_t, Device::kCpu, true> cpu_f16_int8_rows;
#ifdef USE_CUDA
  static const FfnFallbackOp<float, Device::kCuda> cuda_f32;
  static const FfnFallbackOp<Ort::Float16_t, Device::kCuda> cuda_f16;
  const OrtCustomOp* ops[] = {&cpu_f32, &cpu_f16, &cpu_f32_int8_rows, &cpu_f16_int8_rows, &cuda_f32, &cuda_f16};
#else
  const OrtCustomOp* ops[] = {&cpu_f32, &cpu_f16, &cpu_f32_int8_rows, &cpu_f16_int8_rows};
#endif

  OrtCustomOpDomain* raw = nullptr;
  if (OrtStatusPtr status = api.CreateCustomOpDomain(kDomain, &raw)) return status;
  static const OrtApi* release_api = &api;
  std::unique_ptr<OrtCustomOpDomain, void (*)(OrtCustomOpDomain*)> domain(
      raw, [](OrtCustomOpDomain* p) { release_api->ReleaseCustomOpDomain(p); });
  for (const OrtCustomOp* op : ops) {
    if (OrtStatusPtr status = api.CustomOpDomain_Add(domain.get(), op)) return status;
  }
  if (OrtStatusPtr status = api.AddCustomOpDomain(options, domain.get())) return status;
  std::lock_guard<std::mutex> lock(domains_mutex);
  domains().push_back(std::move(domain));
  return nullptr;
}

}  // namespace

TARDIS_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // API 1 always exists and has CreateStatus.
    const OrtApi* old_api = api_base->GetApi(1);
    std::ostringstream message;
    message << "tardis-onnx custom ops need ONNX Runtime API >= " << ORT_API_VERSION << " (ONNX Runtime 1."
            << ORT_API_VERSION << " or newer); this ONNX Runtime (" << api_base->GetVersionString()
            << ") is older";
    return old_api ? old_api->CreateStatus(ORT_FAIL, message.str().c_str()) : nullptr;
  }
  Ort::InitApi(api);
  return register_domain(*api, options);
}
