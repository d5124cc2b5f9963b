// A minimal C++ host for a rewritten model: what an ONNX Runtime-based server does with it.
//
//     host_run [--threads N] MODEL LIBRARY OUT_DIR [NAME=TYPE:SHAPE:FILE ...]
//
// Registers LIBRARY (libtardis_ops.so) on the session options, as Triton's ONNX Runtime backend
// does for `model_operations { op_library_filename: "..." }`, creates a CPU session for MODEL and
// runs it once on the given inputs: TYPE f32 or i64, SHAPE like 1x7x384 (0 allowed), FILE the raw
// little-endian values. Writes output k to OUT_DIR/k.bin (raw) and prints "k name type shape" per
// output. Any error: one line on stderr, exit 2. Build against the ONNX Runtime C/C++ headers and
// library, ORT_LIB holding libonnxruntime.so and libonnxruntime.so.1 (as a release archive's lib/
// does; tests/test_custom_op.py links the Python wheel's library under those names):
//
//     g++ -std=c++17 -I$ORT_INCLUDE_DIR custom_ops/host_run.cc -L$ORT_LIB -lonnxruntime -Wl,-rpath,$ORT_LIB -o host_run
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Input {
  std::string name;
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;
  std::vector<char> bytes;
};

// "1x7x384" -> {1, 7, 384}
std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t end = std::min(text.find('x', start), text.size());
    const std::string dim = text.substr(start, end - start);
    if (dim.empty() || dim.find_first_not_of("0123456789") != std::string::npos) {
      throw std::runtime_error("shape '" + text + "' is not like 1x7x384");
    }
    shape.push_back(std::stoll(dim));
    start = end + 1;
  }
  return shape;
}

// NAME=TYPE:SHAPE:FILE
Input parse_input(const std::string& spec) {
  const size_t eq = spec.find('='), c1 = spec.find(':', eq), c2 = spec.find(':', c1 + 1);
  if (eq == std::string::npos || c1 == std::string::npos || c2 == std::string::npos) {
    throw std::runtime_error("input '" + spec + "' is not NAME=TYPE:SHAPE:FILE");
  }
  Input input{spec.substr(0, eq), ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,
              parse_shape(spec.substr(c1 + 1, c2 - c1 - 1)), {}};
  const std::string type = spec.substr(eq + 1, c1 - eq - 1);
  size_t element = 0;
  if (type == "f32") {
    input.type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, element = 4;
  } else if (type == "i64") {
    input.type = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, element = 8;
  } else {
    throw std::runtime_error("input '" + input.name + "': type must be f32 or i64, got '" + type + "'");
  }
  std::ifstream file(spec.substr(c2 + 1), std::ios::binary);
  if (!file) throw std::runtime_error("input '" + input.name + "': cannot read " + spec.substr(c2 + 1));
  input.bytes.assign(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
  size_t count = 1;
  for (int64_t dim : input.shape) count *= static_cast<size_t>(dim);
  if (input.bytes.size() != count * element) {
    throw std::runtime_error("input '" + input.name + "': " + std::to_string(input.bytes.size()) +
                             " bytes, shape needs " + std::to_string(count * element));
  }
  return input;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text;
  for (size_t k = 0; k < shape.size(); ++k) text += (k ? "x" : "") + std::to_string(shape[k]);
  return text.empty() ? "scalar" : text;
}

int run(int argc, char** argv) {
  int arg = 1, threads = 0;
  if (arg + 1 < argc && std::string(argv[arg]) == "--threads") {
    threads = std::atoi(argv[arg + 1]);
    arg += 2;
  }
  if (argc - arg < 3) {
    throw std::runtime_error("usage: host_run [--threads N] MODEL LIBRARY OUT_DIR [NAME=TYPE:SHAPE:FILE ...]");
  }
  const std::string model = argv[arg], library = argv[arg + 1], out_dir = argv[arg + 2];
  std::vector<Input> inputs;
  for (int k = arg + 3; k < argc; ++k) inputs.push_back(parse_input(argv[k]));

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "host_run");
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(threads);
  options.RegisterCustomOpsLibrary(library.c_str());
  Ort::Session session(env, model.c_str(), options);

  const auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<Ort::Value> values;
  std::vector<const char*> input_names;
  for (Input& input : inputs) {
    values.push_back(Ort::Value::CreateTensor(memory, input.bytes.data(), input.bytes.size(), input.shape.data(),
                                              input.shape.size(), input.type));
    input_names.push_back(input.name.c_str());
  }
  Ort::AllocatorWithDefaultOptions allocator;
  std::vector<Ort::AllocatedStringPtr> owned;
  std::vector<const char*> output_names;
  for (size_t k = 0; k < session.GetOutputCount(); ++k) {
    owned.push_back(session.GetOutputNameAllocated(k, allocator));
    output_names.push_back(owned.back().get());
  }
  auto outputs = session.Run(Ort::RunOptions{nullptr}, input_names.data(), values.data(), values.size(),
                             output_names.data(), output_names.size());
  for (size_t k = 0; k < outputs.size(); ++k) {
    const auto info = outputs[k].GetTensorTypeAndShapeInfo();
    const auto type = info.GetElementType();
    const size_t element = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64   ? 8
                           : type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 4
                                                                         : 0;
    if (element == 0) throw std::runtime_error(std::string("output '") + output_names[k] + "' is neither f32 nor i64");
    const std::string path = out_dir + "/" + std::to_string(k) + ".bin";
    std::ofstream file(path, std::ios::binary);
    file.write(static_cast<const char*>(outputs[k].GetTensorRawData()),
               static_cast<std::streamsize>(info.GetElementCount() * element));
    if (!file) throw std::runtime_error("cannot write " + path);
    std::printf("%zu %s %s %s\n", k, output_names[k], element == 4 ? "f32" : "i64",
                shape_text(info.GetShape()).c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // Ort::Exception included
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
