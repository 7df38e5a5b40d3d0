// gali_masks.cu -- the GPU backend of the GaliMasks DALI operator (schema and CPU backend:
// gali_masks.cc).
//
// Sample ids stay on the GPU: the kernel (masks_kernel in mask_sampler.h, the same routine the
// CPU backend runs) gets device arrays of per-sample id and output pointers, copied in one
// transfer through a DALI scratchpad on the workspace's stream.
#include <vector>

#include "dali/core/cuda_error.h"
#include "dali/kernels/dynamic_scratchpad.h"
#include "dali/pipeline/operator/operator.h"
#include "mask_sampler.h"

namespace gali {

// Defined in gali_masks.cc.
MaskArgs SetupGaliMasks(const dali::OpSpec &spec, const dali::Workspace &ws,
                        std::vector<dali::OutputDesc> &output_desc);

class GaliMasksGPU : public dali::Operator<dali::GPUBackend> {
 public:
  explicit GaliMasksGPU(const dali::OpSpec &spec) : Operator<dali::GPUBackend>(spec) {}

 protected:
  bool SetupImpl(std::vector<dali::OutputDesc> &output_desc, const dali::Workspace &ws) override {
    args_ = SetupGaliMasks(spec_, ws, output_desc);
    return true;
  }

  void RunImpl(dali::Workspace &ws) override {
    const auto &ids = ws.Input<dali::GPUBackend>(0);
    auto &out = ws.Output<dali::GPUBackend>(0);
    out.SetLayout("FHW");
    const int num_samples = ids.num_samples();
    std::vector<const int64_t *> id_ptrs(num_samples);
    std::vector<uint8_t *> out_ptrs(num_samples);
    for (int i = 0; i < num_samples; i++) {
      id_ptrs[i] = ids.tensor<int64_t>(i);
      out_ptrs[i] = out.mutable_tensor<uint8_t>(i);
    }
    dali::kernels::DynamicScratchpad scratch(ws.stream());
    auto [d_ids, d_outs] = scratch.ToContiguousGPU(ws.stream(), id_ptrs, out_ptrs);
    CUDA_CALL(launch_masks(args_, d_ids, d_outs, num_samples, ws.stream()));
  }

 private:
  MaskArgs args_{};
};

DALI_REGISTER_OPERATOR(GaliMasks, ::gali::GaliMasksGPU, ::dali::GPU);

}  // namespace gali
