// harness_cuda.cu -- the harness's --device cuda path: runs launch_masks / masks_kernel from
// mask_sampler.h, the same kernel the GPU operator launches, on sample ids first_id..first_id+N-1.
#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "mask_sampler.h"

namespace {

// Device buffers freed on scope exit.
struct DeviceBuffers {
  std::vector<void *> ptrs;
  ~DeviceBuffers() {
    for (void *p : ptrs) cudaFree(p);
  }
  cudaError_t alloc(void **p, size_t bytes) {
    const cudaError_t e = cudaMalloc(p, bytes);
    if (e == cudaSuccess) ptrs.push_back(*p);
    return e;
  }
};

std::string describe(const char *what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

}  // namespace

// Renders count samples' masks on the GPU into out (host, count * M * H * W bytes), `repeat`
// times (CUDA events time the launches: *ms_per_batch is their mean). Returns an empty string on
// success, else the error.
std::string render_masks_cuda(const gali::MaskArgs &a, int64_t first_id, int64_t count, int repeat,
                              uint8_t *out, double *ms_per_batch) {
  int devices = 0;
  cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0)
    return e != cudaSuccess ? describe("no usable CUDA device", e) : "no CUDA device present";
  if (count == 0) return {};

  const int64_t per_sample = a.num_masks * a.height * a.width;
  std::vector<int64_t> ids(count);
  for (int64_t i = 0; i < count; i++) ids[i] = first_id + i;

  DeviceBuffers buffers;
  int64_t *d_ids = nullptr;
  uint8_t *d_out = nullptr;
  const int64_t **d_id_ptrs = nullptr;
  uint8_t **d_out_ptrs = nullptr;
  if ((e = buffers.alloc(reinterpret_cast<void **>(&d_ids), count * sizeof(int64_t))) ||
      (e = buffers.alloc(reinterpret_cast<void **>(&d_out), count * per_sample)) ||
      (e = buffers.alloc(reinterpret_cast<void **>(&d_id_ptrs), count * sizeof(void *))) ||
      (e = buffers.alloc(reinterpret_cast<void **>(&d_out_ptrs), count * sizeof(void *))))
    return describe("cudaMalloc", e);

  std::vector<const int64_t *> id_ptrs(count);
  std::vector<uint8_t *> out_ptrs(count);
  for (int64_t i = 0; i < count; i++) {
    id_ptrs[i] = d_ids + i;
    out_ptrs[i] = d_out + i * per_sample;
  }
  if ((e = cudaMemcpy(d_ids, ids.data(), count * sizeof(int64_t), cudaMemcpyHostToDevice)) ||
      (e = cudaMemcpy(d_id_ptrs, id_ptrs.data(), count * sizeof(void *),
                      cudaMemcpyHostToDevice)) ||
      (e = cudaMemcpy(d_out_ptrs, out_ptrs.data(), count * sizeof(void *),
                      cudaMemcpyHostToDevice)))
    return describe("cudaMemcpy to device", e);
  if ((e = gali::launch_masks(a, d_id_ptrs, d_out_ptrs, count, 0)))  // warm-up, and the output
    return describe("kernel launch", e);
  if ((e = cudaDeviceSynchronize())) return describe("kernel", e);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaEventRecord(start);
  for (int r = 0; r < repeat && e == cudaSuccess; r++) e = gali::launch_masks(a, d_id_ptrs, d_out_ptrs, count, 0);
  cudaEventRecord(stop);
  cudaEventSynchronize(stop);
  float ms = 0;
  cudaEventElapsedTime(&ms, start, stop);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (e || (e = cudaDeviceSynchronize())) return describe("timed kernels", e);
  *ms_per_batch = ms / repeat;
  if ((e = cudaMemcpy(out, d_out, count * per_sample, cudaMemcpyDeviceToHost)))
    return describe("cudaMemcpy to host", e);
  return {};
}
