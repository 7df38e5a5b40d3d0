// harness.cc -- gali_masks_harness: runs the GaliMasks sampling routine (mask_sampler.h) without
// DALI and writes the masks as raw bytes, so tests can compare the operator against a reference.
//
//   gali_masks_harness --seed S --first-id A --count N --masks M --height H --width W
//       --kind-weights a,b,c --box-min .. --box-max .. --eval-min .. --eval-max ..
//       --strokes S --max-thickness T --min-pixels .. --max-pixels .. --max-tries ..
//       [--device cpu|cuda] [--repeat R] --out FILE
//
// FILE gets N*M*H*W uint8 values (0/1) for sample ids A..A+N-1, in C order (sample, mask, row,
// column). --device cuda runs the GPU operator's kernel (builds with CUDA only). --repeat R draws
// the batch R times and prints "ms_per_batch <t>" (the mean; the device's kernel time with cuda).
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "mask_sampler.h"

#ifdef GALI_WITH_CUDA
// Defined in harness_cuda.cu. Returns an empty string on success, else the error; the mean kernel
// time of `repeat` launches goes to *ms_per_batch.
std::string render_masks_cuda(const gali::MaskArgs &a, int64_t first_id, int64_t count, int repeat,
                              uint8_t *out, double *ms_per_batch);
#endif

namespace {

const char *const kUsage =
    "usage: gali_masks_harness --seed S --first-id A --count N --masks M --height H --width W\n"
    "    --kind-weights a,b,c --box-min N --box-max N --eval-min N --eval-max N --strokes S\n"
    "    --max-thickness T --min-pixels N --max-pixels N --max-tries N [--device cpu|cuda]\n"
    "    [--repeat R] --out FILE\n";

const std::vector<std::string> kRequired = {
    "--seed", "--first-id", "--count", "--masks", "--height", "--width", "--kind-weights",
    "--box-min", "--box-max", "--eval-min", "--eval-max", "--strokes", "--max-thickness",
    "--min-pixels", "--max-pixels", "--max-tries", "--out"};

[[noreturn]] void die(const std::string &message) {
  std::fprintf(stderr, "gali_masks_harness: %s\n%s", message.c_str(), kUsage);
  std::exit(2);
}

int64_t parse_int(const std::string &flag, const std::string &text) {
  errno = 0;
  char *end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0)
    die("bad value for " + flag + ": '" + text + "' (expected an integer)");
  return value;
}

}  // namespace

int main(int argc, char **argv) {
  std::map<std::string, std::string> opts = {{"--device", "cpu"}, {"--repeat", "1"}};
  for (int i = 1; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    bool known = flag == "--device" || flag == "--repeat";
    for (const auto &name : kRequired) known = known || flag == name;
    if (!known) die("unknown option " + flag);
    if (i + 1 >= argc) die("missing value for " + flag);
    opts[flag] = argv[i + 1];
  }
  for (const auto &name : kRequired)
    if (!opts.count(name)) die("missing required option " + name);
  auto get = [&](const char *flag) { return parse_int(flag, opts[flag]); };

  gali::MaskArgs a{};
  a.mask_seed = get("--seed");
  a.num_masks = get("--masks");
  a.height = get("--height");
  a.width = get("--width");
  std::stringstream weights(opts["--kind-weights"]);
  std::string item;
  int num_weights = 0;
  while (std::getline(weights, item, ',')) {
    if (num_weights == 3) die("--kind-weights needs exactly 3 comma-separated integers");
    a.kind_weights[num_weights++] = parse_int("--kind-weights", item);
  }
  if (num_weights != 3) die("--kind-weights needs exactly 3 comma-separated integers");
  a.box_min = get("--box-min");
  a.box_max = get("--box-max");
  a.eval_min = get("--eval-min");
  a.eval_max = get("--eval-max");
  a.num_strokes = get("--strokes");
  a.max_thickness = get("--max-thickness");
  a.min_pixels = get("--min-pixels");
  a.max_pixels = get("--max-pixels");
  a.max_tries = get("--max-tries");
  const std::string error = gali::validate_args(a);
  if (!error.empty()) die(error);
  const int64_t first_id = get("--first-id");
  const int64_t count = get("--count");
  if (count < 0) die("--count must be >= 0, got " + std::to_string(count));
  const std::string device = opts["--device"];
  if (device != "cpu" && device != "cuda")
    die("--device must be cpu or cuda, got '" + device + "'");
  const int64_t repeat = get("--repeat");
  if (repeat < 1 || repeat > 1000000) die("--repeat must be in [1, 1000000], got " + std::to_string(repeat));

  const int64_t per_sample = a.num_masks * a.height * a.width;
  std::vector<uint8_t> out(static_cast<size_t>(count * per_sample));
  double ms_per_batch = 0;
  if (device == "cpu") {
    const int64_t area = a.height * a.width;
    const auto start = std::chrono::steady_clock::now();
    for (int64_t r = 0; r < repeat; r++)
      for (int64_t i = 0; i < count; i++)
        for (int64_t m = 0; m < a.num_masks; m++)
          gali::render_mask_host(a, first_id + i, m, out.data() + i * per_sample + m * area);
    const std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
    ms_per_batch = elapsed.count() / static_cast<double>(repeat);
  } else {
#ifdef GALI_WITH_CUDA
    const std::string cuda_error =
        render_masks_cuda(a, first_id, count, static_cast<int>(repeat), out.data(), &ms_per_batch);
    if (!cuda_error.empty()) {
      std::fprintf(stderr, "gali_masks_harness: --device cuda: %s\n", cuda_error.c_str());
      return 1;
    }
#else
    std::fputs("gali_masks_harness: --device cuda: this build has no CUDA backend "
               "(configured with GALI_NATIVE_CUDA=OFF or without a CUDA compiler)\n", stderr);
    return 1;
#endif
  }

  if (repeat > 1) std::printf("ms_per_batch %.6f\n", ms_per_batch);
  std::ofstream file(opts["--out"], std::ios::binary);
  file.write(reinterpret_cast<const char *>(out.data()), static_cast<std::streamsize>(out.size()));
  file.close();
  if (!file) {
    std::fprintf(stderr, "gali_masks_harness: cannot write %s\n", opts["--out"].c_str());
    return 1;
  }
  return 0;
}
