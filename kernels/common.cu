// Error state and version of the baseline library's C ABI.
#include <cstring>

#include "common.cuh"

namespace gallop_bl {

namespace {
thread_local char g_last_error[512] = "";
}

void set_error(const char* where, cudaError_t err) {
  std::snprintf(g_last_error, sizeof(g_last_error), "%s: %s (%s)", where, cudaGetErrorName(err),
                cudaGetErrorString(err));
}

void set_error_msg(const char* msg) { std::snprintf(g_last_error, sizeof(g_last_error), "%s", msg); }

}  // namespace gallop_bl

extern "C" int gallop_bl_abi_version(void) { return 1; }

extern "C" const char* gallop_bl_last_error(void) { return gallop_bl::g_last_error; }
