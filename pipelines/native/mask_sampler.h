// mask_sampler.h -- the one mask-sampling routine of the GaliMasks DALI operator.
//
// Everything that decides which pixels of a mask are set lives here, so the CPU operator
// (gali_masks.cc), the GPU operator (gali_masks.cu) and the standalone harness (harness.cc,
// harness_cuda.cu) draw exactly the same masks, and a Python transcription of this file can
// reproduce them bit for bit.
//
// For sample id s and mask slot m a counter-based stream keyed by (mask_seed, s, m) draws up to
// max_tries candidates (a box, an "eval" box or a set of thick strokes, chosen by kind_weights);
// the first candidate whose pixel count lies in [min_pixels, max_pixels] is the mask. If none
// is accepted, a full-width horizontal band of ceil(min_pixels / width) rows is used instead.
// All stream arithmetic is uint64_t with wrap-around; pixel tests use int64_t and are exact
// (no overflow) within the limits that validate_args enforces.
#ifndef GALI_PIPELINES_NATIVE_MASK_SAMPLER_H_
#define GALI_PIPELINES_NATIVE_MASK_SAMPLER_H_

#include <cstdint>
#include <string>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#define GALI_HD __host__ __device__
#else
#define GALI_HD
#endif

namespace gali {

constexpr int kMaxStrokes = 16;
// Limits that keep every int64_t product in stroke_hits exact: |cross| < 2^29, len2 < 2^29,
// t^2 <= 2^32, so 4 * cross^2 < 2^60 and t^2 * len2 < 2^61.
constexpr int64_t kMaxSide = 16384;
constexpr int64_t kMaxThickness = 65536;

enum MaskKind : int32_t { kBox = 0, kEvalBox = 1, kStroke = 2, kFallbackBand = 3 };

// The operator's arguments, as the sampler sees them.
struct MaskArgs {
  int64_t mask_seed;
  int64_t num_masks;
  int64_t height;
  int64_t width;
  int64_t kind_weights[3];  // box, eval_box, stroke
  int64_t box_min, box_max;
  int64_t eval_min, eval_max;
  int64_t num_strokes;
  int64_t max_thickness;
  int64_t min_pixels, max_pixels;
  int64_t max_tries;
};

// A segment of radius t / 2 between the pixel centres (x0, y0) and (x1, y1).
struct Stroke {
  int32_t x0, y0, x1, y1, t;
};

// One drawn candidate: a rectangle (kBox, kEvalBox, kFallbackBand) or strokes (kStroke).
struct MaskParams {
  int32_t kind;
  int64_t top, left, h, w;
  int32_t num_strokes;
  Stroke strokes[kMaxStrokes];
};

GALI_HD inline uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  z ^= z >> 31;
  return z;
}

GALI_HD inline uint64_t mask_key(int64_t seed, int64_t sample, int64_t slot) {
  return mix64(mix64(mix64(static_cast<uint64_t>(seed)) + static_cast<uint64_t>(sample)) +
               static_cast<uint64_t>(slot));
}

// Counter-based random stream: the i-th draw is mix64(key + i * golden), i = 1, 2, ...
struct MaskStream {
  uint64_t key;
  uint64_t i;

  GALI_HD explicit MaskStream(uint64_t k) : key(k), i(0) {}

  GALI_HD uint64_t next() {
    i += 1;
    return mix64(key + i * 0x9E3779B97F4A7C15ull);
  }

  // Uniform integer in [lo, hi] (inclusive); requires hi - lo + 1 <= 2^32.
  GALI_HD int64_t uniform(int64_t lo, int64_t hi) {
    const uint64_t n = static_cast<uint64_t>(hi - lo + 1);
    return lo + static_cast<int64_t>(((next() >> 32) * n) >> 32);
  }
};

// Draws one candidate. Each draw is its own statement: the order of draws is part of the routine.
GALI_HD inline MaskParams draw_candidate(MaskStream &st, const MaskArgs &a) {
  MaskParams p{};
  const int64_t w0 = a.kind_weights[0], w1 = a.kind_weights[1];
  const int64_t u = st.uniform(0, w0 + w1 + a.kind_weights[2] - 1);
  p.kind = u < w0 ? kBox : (u < w0 + w1 ? kEvalBox : kStroke);
  if (p.kind != kStroke) {
    const int64_t lo = p.kind == kBox ? a.box_min : a.eval_min;
    const int64_t hi = p.kind == kBox ? a.box_max : a.eval_max;
    p.h = st.uniform(lo, hi);
    p.w = st.uniform(lo, hi);
    p.top = st.uniform(0, a.height - p.h);
    p.left = st.uniform(0, a.width - p.w);
    return p;
  }
  p.num_strokes = static_cast<int32_t>(a.num_strokes);
  for (int j = 0; j < p.num_strokes; j++) {
    Stroke &s = p.strokes[j];
    s.x0 = static_cast<int32_t>(st.uniform(0, a.width - 1));
    s.y0 = static_cast<int32_t>(st.uniform(0, a.height - 1));
    s.x1 = static_cast<int32_t>(st.uniform(0, a.width - 1));
    s.y1 = static_cast<int32_t>(st.uniform(0, a.height - 1));
    s.t = static_cast<int32_t>(st.uniform(1, a.max_thickness));
  }
  return p;
}

// The band used when no candidate is accepted; drawn from the same stream after the last try.
GALI_HD inline MaskParams fallback(MaskStream &st, const MaskArgs &a) {
  MaskParams p{};
  int64_t h = (a.min_pixels + a.width - 1) / a.width;
  if (h < 1) h = 1;
  if (h > a.height) h = a.height;
  p.kind = kFallbackBand;
  p.h = h;
  p.w = a.width;
  p.left = 0;
  p.top = st.uniform(0, a.height - h);
  return p;
}

GALI_HD inline bool stroke_hits(const Stroke &s, int64_t px, int64_t py) {
  const int64_t ex = int64_t{s.x1} - s.x0, ey = int64_t{s.y1} - s.y0;
  const int64_t dx = px - s.x0, dy = py - s.y0;
  const int64_t along = dx * ex + dy * ey, len2 = ex * ex + ey * ey;
  const int64_t tt = int64_t{s.t} * s.t;
  if (along <= 0) return 4 * (dx * dx + dy * dy) <= tt;
  if (along >= len2) {
    const int64_t fx = dx - ex, fy = dy - ey;
    return 4 * (fx * fx + fy * fy) <= tt;
  }
  const int64_t cross = dx * ey - dy * ex;
  return 4 * cross * cross <= tt * len2;
}

// Whether pixel (row r, column c) is set by candidate p.
GALI_HD inline bool masked(const MaskParams &p, int64_t r, int64_t c) {
  if (p.kind == kStroke) {
    for (int j = 0; j < p.num_strokes; j++)
      if (stroke_hits(p.strokes[j], c, r)) return true;
    return false;
  }
  return p.top <= r && r < p.top + p.h && p.left <= c && c < p.left + p.w;
}

GALI_HD inline bool accepted(const MaskArgs &a, int64_t count) {
  return a.min_pixels <= count && count <= a.max_pixels;
}

// Empty if the arguments are valid, else a message naming the first bad argument and its value.
inline std::string validate_args(const MaskArgs &a) {
  auto bad = [](const char *name, int64_t value, const std::string &rule) {
    return "Invalid argument " + std::string(name) + " = " + std::to_string(value) + ": " + rule;
  };
  const std::string side_limit = std::to_string(kMaxSide);
  if (a.num_masks < 1) return bad("num_masks", a.num_masks, "must be >= 1");
  if (a.height < 1 || a.height > kMaxSide)
    return bad("height", a.height, "must be in [1, " + side_limit + "]");
  if (a.width < 1 || a.width > kMaxSide)
    return bad("width", a.width, "must be in [1, " + side_limit + "]");
  const char *weight_names[3] = {"kind_weights[0] (box)", "kind_weights[1] (eval_box)",
                                 "kind_weights[2] (stroke)"};
  int64_t total = 0;
  for (int k = 0; k < 3; k++) {
    if (a.kind_weights[k] < 0) return bad(weight_names[k], a.kind_weights[k], "must be >= 0");
    total += a.kind_weights[k];
  }
  if (total <= 0 || total > (int64_t{1} << 32))
    return bad("kind_weights (sum)", total, "must be in [1, 2^32]");
  const int64_t min_side = a.height < a.width ? a.height : a.width;
  const std::string side = std::to_string(min_side);
  if (a.box_min < 1 || a.box_min > min_side)
    return bad("box_min", a.box_min, "must be in [1, min(height, width) = " + side + "]");
  if (a.box_max < a.box_min || a.box_max > min_side)
    return bad("box_max", a.box_max, "must be in [box_min = " + std::to_string(a.box_min) +
                                     ", min(height, width) = " + side + "]");
  if (a.eval_min < 1 || a.eval_min > min_side)
    return bad("eval_min", a.eval_min, "must be in [1, min(height, width) = " + side + "]");
  if (a.eval_max < a.eval_min || a.eval_max > min_side)
    return bad("eval_max", a.eval_max, "must be in [eval_min = " + std::to_string(a.eval_min) +
                                       ", min(height, width) = " + side + "]");
  if (a.num_strokes < 1 || a.num_strokes > kMaxStrokes)
    return bad("num_strokes", a.num_strokes, "must be in [1, " + std::to_string(kMaxStrokes) + "]");
  if (a.max_thickness < 1 || a.max_thickness > kMaxThickness)
    return bad("max_thickness", a.max_thickness,
               "must be in [1, " + std::to_string(kMaxThickness) + "]");
  const int64_t area = a.height * a.width;
  const std::string area_s = std::to_string(area);
  if (a.min_pixels < 0 || a.min_pixels > area)
    return bad("min_pixels", a.min_pixels, "must be in [0, height * width = " + area_s + "]");
  if (a.max_pixels < a.min_pixels || a.max_pixels > area)
    return bad("max_pixels", a.max_pixels, "must be in [min_pixels = " +
                                           std::to_string(a.min_pixels) +
                                           ", height * width = " + area_s + "]");
  if (a.max_tries < 1) return bad("max_tries", a.max_tries, "must be >= 1");
  return {};
}

// Host rasteriser: writes the height x width mask of (sample, slot) to out, row-major.
inline void render_mask_host(const MaskArgs &a, int64_t sample, int64_t slot, uint8_t *out) {
  MaskStream st(mask_key(a.mask_seed, sample, slot));
  auto raster = [&](const MaskParams &p) {
    int64_t count = 0;
    for (int64_t r = 0; r < a.height; r++) {
      for (int64_t c = 0; c < a.width; c++) {
        const bool m = masked(p, r, c);
        out[r * a.width + c] = m;
        count += m;
      }
    }
    return count;
  };
  for (int64_t t = 0; t < a.max_tries; t++)
    if (accepted(a, raster(draw_candidate(st, a)))) return;
  raster(fallback(st, a));
}

#ifdef __CUDACC__
// One block per (sample, slot): every thread draws the same candidate, the block rasterises it
// with a stride loop, counts set pixels in shared memory and accepts or draws again.
// ids[i] points at sample i's id, outs[i] at its num_masks x height x width output.
template <int kBlockSize>
__global__ void __launch_bounds__(kBlockSize)
masks_kernel(const MaskArgs a, const int64_t *const *ids, uint8_t *const *outs) {
  const int64_t sample = blockIdx.x / a.num_masks, slot = blockIdx.x % a.num_masks;
  const int area = static_cast<int>(a.height * a.width);
  const int width = static_cast<int>(a.width);
  uint8_t *out = outs[sample] + slot * area;
  MaskStream st(mask_key(a.mask_seed, *ids[sample], slot));
  __shared__ unsigned long long count;
  auto raster = [&](const MaskParams &p) {
    unsigned long long local = 0;
    for (int i = threadIdx.x; i < area; i += kBlockSize) {
      const bool m = masked(p, i / width, i % width);
      out[i] = m;
      local += m;
    }
    return local;
  };
  for (int64_t t = 0; t < a.max_tries; t++) {
    const MaskParams p = draw_candidate(st, a);
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    atomicAdd(&count, raster(p));
    __syncthreads();
    const int64_t total = static_cast<int64_t>(count);
    __syncthreads();  // everyone has read count before thread 0 resets it
    if (accepted(a, total)) return;
  }
  raster(fallback(st, a));
}

// Launches masks_kernel for num_samples samples on stream; ids and outs are device arrays.
inline cudaError_t launch_masks(const MaskArgs &a, const int64_t *const *ids,
                                uint8_t *const *outs, int64_t num_samples, cudaStream_t stream) {
  constexpr int kBlockSize = 256;
  const int64_t blocks = num_samples * a.num_masks;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  masks_kernel<kBlockSize><<<static_cast<unsigned>(blocks), kBlockSize, 0, stream>>>(a, ids, outs);
  return cudaGetLastError();
}
#endif  // __CUDACC__

}  // namespace gali

#endif  // GALI_PIPELINES_NATIVE_MASK_SAMPLER_H_
