// CMake probe (not part of the library): does this CUDA toolkit's CUB have DeviceTopK with the
// interface device_topk.cuh uses? Compiled once at configure time.
#include "device_topk.cuh"

int main() {
  size_t bytes = 0;
  return static_cast<int>(
      gallop_bl::device_topk_threshold(nullptr, 1024, 10, nullptr, &bytes, nullptr, nullptr));
}
