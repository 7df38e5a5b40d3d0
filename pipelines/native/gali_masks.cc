// gali_masks.cc -- the GaliMasks DALI operator: schema, shared Setup and the CPU backend.
//
// nvidia.dali.fn.gali_masks(sample_ids, ...) returns, for each sample, num_masks binary masks
// (uint8 0/1, shape (num_masks, height, width), layout "FHW") drawn by the routine in
// mask_sampler.h from (mask_seed, sample id, mask slot) only, so a sample id always gets the same
// masks whatever its batch or position. The GPU backend is in gali_masks.cu.
#include <string>
#include <vector>

#include "dali/pipeline/operator/operator.h"
#include "mask_sampler.h"

namespace gali {

DALI_SCHEMA(GaliMasks)
    .DocStr(R"(Draws deterministic binary masks for each sample id.

For sample id ``s`` and slot ``m`` a random stream keyed by (``mask_seed``, ``s``, ``m``) draws up
to ``max_tries`` candidates -- a box, an evaluation box or ``num_strokes`` thick strokes, picked
with probabilities proportional to ``kind_weights`` -- and keeps the first one whose number of
set pixels lies in [``min_pixels``, ``max_pixels``]. If none does, a full-width band of
``ceil(min_pixels / width)`` rows is used. Output: uint8 (``num_masks``, ``height``, ``width``)
per sample, 1 = masked.)")
    .NumInput(1)
    .NumOutput(1)
    .InputDox(0, "sample_ids", "TensorList of int64",
              "One sample id per sample, a scalar (shape ``()`` or ``(1,)``).")
    .OutputDType(0, DALI_UINT8)
    .OutputNDim(0, 3)
    .OutputLayout(0, dali::TensorLayout("FHW"))
    .AddOptionalArg("mask_seed", "Seed of the mask streams.", int64_t{0})
    .AddArg("num_masks", "Masks per sample (M >= 1).", DALI_INT32)
    .AddArg("height", "Mask height H, in [1, 16384].", DALI_INT32)
    .AddArg("width", "Mask width W, in [1, 16384].", DALI_INT32)
    .AddArg("kind_weights",
            "Three non-negative weights (box, eval_box, stroke) with a positive sum.",
            DALI_INT_VEC)
    .AddArg("box_min", "Smallest side of a 'box', in [1, min(H, W)].", DALI_INT32)
    .AddArg("box_max", "Largest side of a 'box', in [box_min, min(H, W)].", DALI_INT32)
    .AddArg("eval_min", "Smallest side of an 'eval_box', in [1, min(H, W)].", DALI_INT32)
    .AddArg("eval_max", "Largest side of an 'eval_box', in [eval_min, min(H, W)].",
            DALI_INT32)
    .AddArg("num_strokes", "Strokes per 'stroke' candidate, in [1, 16].", DALI_INT32)
    .AddArg("max_thickness", "Largest stroke thickness T, in [1, 65536].", DALI_INT32)
    .AddArg("min_pixels", "Fewest set pixels a candidate may have, in [0, H * W].",
            DALI_INT64)
    .AddArg("max_pixels", "Most set pixels a candidate may have, in [min_pixels, H * W].",
            DALI_INT64)
    .AddArg("max_tries", "Candidates drawn before the fallback band (>= 1).", DALI_INT32);

// Shared by both backends (the GPU one declares it in gali_masks.cu): reads and validates the
// arguments, checks the sample ids and describes output 0. Returns the arguments.
MaskArgs SetupGaliMasks(const dali::OpSpec &spec, const dali::Workspace &ws,
                        std::vector<dali::OutputDesc> &output_desc) {
  MaskArgs a{};
  a.mask_seed = spec.GetArgument<int64_t>("mask_seed");
  a.num_masks = spec.GetArgument<int>("num_masks");
  a.height = spec.GetArgument<int>("height");
  a.width = spec.GetArgument<int>("width");
  const auto weights = spec.GetRepeatedArgument<int>("kind_weights");
  if (weights.size() != 3) {
    DALI_FAIL("Invalid argument kind_weights: expected 3 values (box, eval_box, stroke), got ",
              weights.size(), ".");
  }
  for (int k = 0; k < 3; k++) a.kind_weights[k] = weights[k];
  a.box_min = spec.GetArgument<int>("box_min");
  a.box_max = spec.GetArgument<int>("box_max");
  a.eval_min = spec.GetArgument<int>("eval_min");
  a.eval_max = spec.GetArgument<int>("eval_max");
  a.num_strokes = spec.GetArgument<int>("num_strokes");
  a.max_thickness = spec.GetArgument<int>("max_thickness");
  a.min_pixels = spec.GetArgument<int64_t>("min_pixels");
  a.max_pixels = spec.GetArgument<int64_t>("max_pixels");
  a.max_tries = spec.GetArgument<int>("max_tries");
  const std::string problem = validate_args(a);
  if (!problem.empty()) {
    DALI_FAIL(problem);
  }

  if (ws.GetInputDataType(0) != DALI_INT64) {
    DALI_FAIL("sample_ids must be int64, got ", ws.GetInputDataType(0), ".");
  }
  const auto &ids_shape = ws.GetInputShape(0);
  const int num_samples = ids_shape.num_samples();
  for (int i = 0; i < num_samples; i++) {
    const auto shape = ids_shape[i];
    if (shape.size() > 1 || (shape.size() == 1 && shape[0] != 1)) {
      DALI_FAIL("sample_ids: each sample must be a scalar (shape () or (1,)); sample ", i,
                " has shape ", shape, ".");
    }
  }
  output_desc.resize(1);
  output_desc[0].shape = dali::uniform_list_shape(
      num_samples, dali::TensorShape<3>(a.num_masks, a.height, a.width));
  output_desc[0].type = DALI_UINT8;
  return a;
}

class GaliMasksCPU : public dali::Operator<dali::CPUBackend> {
 public:
  explicit GaliMasksCPU(const dali::OpSpec &spec) : Operator<dali::CPUBackend>(spec) {}

 protected:
  using Operator<dali::CPUBackend>::RunImpl;

  bool SetupImpl(std::vector<dali::OutputDesc> &output_desc, const dali::Workspace &ws) override {
    args_ = SetupGaliMasks(spec_, ws, output_desc);
    return true;
  }

  void RunImpl(dali::Workspace &ws) override {
    const auto &ids = ws.Input<dali::CPUBackend>(0);
    auto &out = ws.Output<dali::CPUBackend>(0);
    out.SetLayout("FHW");
    auto &pool = ws.GetThreadPool();
    const int64_t area = args_.height * args_.width;
    for (int i = 0; i < ids.num_samples(); i++) {
      for (int64_t m = 0; m < args_.num_masks; m++) {
        pool.AddWork([this, &ids, &out, area, i, m](int) {
          render_mask_host(args_, ids.tensor<int64_t>(i)[0], m,
                           out.mutable_tensor<uint8_t>(i) + m * area);
        });
      }
    }
    pool.RunAll();
  }

 private:
  MaskArgs args_{};
};

DALI_REGISTER_OPERATOR(GaliMasks, ::gali::GaliMasksCPU, ::dali::CPU);

}  // namespace gali
