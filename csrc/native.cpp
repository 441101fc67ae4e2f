// Host helpers for packing samples and for the tile metadata of packed attention.
//
// Free functions over numpy arrays, in the style of Megatron's dataset helpers. Each has
// a numpy twin in unimrg_fast/_packing_numpy.py with the same signature and identical
// results; unimrg_fast/packing.py is the public API that picks one and converts inputs.
// These functions still check every value they index with, so a direct call with bad
// input raises ValueError instead of reading out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int32_t kCausal = 0;
constexpr int32_t kNoise = 2;
constexpr int64_t kOverflow = -1;  // fits a pack, but max_packs were already open
constexpr int64_t kRejected = -2;  // longer than max_tokens: can never be packed

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

// A macro, like TORCH_CHECK, so the message is only built when the check fails: these
// checks run once per span or sample, and string building would dominate the run time.
#define REQUIRE(ok, message)                         \
  do {                                               \
    if (!(ok)) throw py::value_error(message);       \
  } while (0)

template <typename T>
const T* vector_data(const CArray<T>& array, const char* name) {
  REQUIRE(array.ndim() == 1, std::string(name) + " must be 1-D, got " +
                                 std::to_string(array.ndim()) + " dimensions");
  return array.data();
}

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& values) {
  py::array_t<T> out(static_cast<py::ssize_t>(values.size()));
  if (!values.empty()) std::memcpy(out.mutable_data(), values.data(), values.size() * sizeof(T));
  return out;
}

// ------------------------------------------------------------------------------ packing

// First-fit over a segment tree of remaining capacities: leaf i is pack i, internal
// nodes hold the max of their subtree, so "lowest pack with room >= len" is one descent.
// Unopened packs start at max_tokens; because packs open left to right, the leftmost
// fitting leaf is an open pack when one fits and otherwise the next pack to open.
py::array_t<int64_t> pack_first_fit_decreasing(const CArray<int64_t>& lengths_array,
                                               int64_t max_tokens, int64_t max_packs) {
  const int64_t* lengths = vector_data(lengths_array, "lengths");
  const int64_t n = lengths_array.shape(0);
  REQUIRE(max_tokens >= 1, "max_tokens must be >= 1, got " + std::to_string(max_tokens));
  int64_t num_fitting = 0;
  for (int64_t i = 0; i < n; ++i) {
    REQUIRE(lengths[i] >= 1, "lengths[" + std::to_string(i) + "] must be >= 1, got " +
                                 std::to_string(lengths[i]));
    num_fitting += lengths[i] <= max_tokens;
  }

  std::vector<int64_t> assignment(n, kRejected);
  {
    py::gil_scoped_release release;
    // Longest first, ties by index: (length, index) pairs are distinct, so an unstable sort
    // of the pairs gives the stable order, and sorting values beats sorting indices.
    std::vector<std::pair<int64_t, int64_t>> order;
    order.reserve(num_fitting);
    int64_t fitting_tokens = 0;
    for (int64_t i = 0; i < n; ++i)
      if (lengths[i] <= max_tokens) {
        order.emplace_back(lengths[i], i);
        // Saturates instead of overflowing: the bound below then falls back to num_fitting.
        fitting_tokens = std::min(fitting_tokens, std::numeric_limits<int64_t>::max() - lengths[i]) +
                         lengths[i];
      }
    std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });

    // First fit leaves at most one pack at most half full (a later pack's first sample
    // would have gone there), so it opens at most 2 * tokens / max_tokens + 1 packs.
    int64_t num_leaves =
        std::min(num_fitting, 2 * std::min(fitting_tokens / max_tokens, num_fitting) + 2);
    if (max_packs > 0) num_leaves = std::min(num_leaves, max_packs);
    num_leaves = std::max<int64_t>(1, num_leaves);
    int64_t width = 1;
    while (width < num_leaves) width *= 2;
    // Padding leaves hold 0, which no length (>= 1) fits.
    std::vector<int64_t> tree(2 * width, 0);
    for (int64_t i = 0; i < num_leaves; ++i) tree[width + i] = max_tokens;
    for (int64_t node = width - 1; node >= 1; --node)
      tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);

    for (const auto& [length, i] : order) {
      if (tree[1] < length) {
        assignment[i] = kOverflow;
        continue;
      }
      int64_t node = 1;
      while (node < width) node = tree[2 * node] >= length ? 2 * node : 2 * node + 1;
      assignment[i] = node - width;
      tree[node] -= length;
      for (node /= 2; node >= 1; node /= 2)
        tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
    }
  }
  return to_numpy(assignment);
}

// ------------------------------------------------------------------------ tile metadata

// offsets[0] == 0 and strictly increasing over count + 1 entries: every `unit` (sample,
// span) holds at least one token.
void check_offsets(const int32_t* offsets, int64_t count, const std::string& name,
                   const std::string& unit) {
  REQUIRE(offsets[0] == 0, name + "[0] must be 0, got " + std::to_string(offsets[0]));
  for (int64_t i = 0; i < count; ++i)
    REQUIRE(offsets[i + 1] > offsets[i],
            name + " must be strictly increasing (every " + unit + " >= 1 token); " + name +
                "[" + std::to_string(i + 1) + "] = " + std::to_string(offsets[i + 1]) +
                " <= " + name + "[" + std::to_string(i) + "] = " + std::to_string(offsets[i]));
}

// Checks that the four layout arrays describe samples made of consecutive spans.
void check_layout(const int32_t* cu, int64_t num_samples, const int32_t* bounds,
                  const int32_t* modes, const int32_t* span_sample, int64_t num_spans) {
  check_offsets(cu, num_samples, "cu_seqlens", "sample");
  check_offsets(bounds, num_spans, "span_bounds", "span");
  REQUIRE(bounds[num_spans] == cu[num_samples],
          "span_bounds[-1] = " + std::to_string(bounds[num_spans]) +
              " must equal cu_seqlens[-1] = " + std::to_string(cu[num_samples]) +
              " (both are the pack's token count)");
  for (int64_t p = 0; p < num_spans; ++p)
    REQUIRE(modes[p] >= 0 && modes[p] <= 2, "span_modes[" + std::to_string(p) +
                                                "] must be 0 (causal), 1 (full) or 2 (noise), got " +
                                                std::to_string(modes[p]));
  for (int64_t p = 0; p < num_spans; ++p) {
    const int64_t previous = p == 0 ? -1 : span_sample[p - 1];
    REQUIRE(p == 0 ? span_sample[p] == 0
                   : span_sample[p] == previous || span_sample[p] == previous + 1,
            "span_sample must start at 0 and step by 0 or 1 (every sample has >= 1 span); "
            "span_sample[" + std::to_string(p) + "] = " + std::to_string(span_sample[p]));
    REQUIRE(span_sample[p] < num_samples,
            "span_sample[" + std::to_string(p) + "] = " + std::to_string(span_sample[p]) +
                " is not a sample index (cu_seqlens holds " + std::to_string(num_samples) + ")");
    if (span_sample[p] != previous)
      REQUIRE(bounds[p] == cu[span_sample[p]],
              "span_sample is inconsistent with cu_seqlens: span " + std::to_string(p) +
                  " starts sample " + std::to_string(span_sample[p]) + " at token " +
                  std::to_string(bounds[p]) + " but cu_seqlens says " +
                  std::to_string(cu[span_sample[p]]));
  }
  REQUIRE(num_spans == 0 || span_sample[num_spans - 1] == num_samples - 1,
          "span_sample must end at the last sample " + std::to_string(num_samples - 1) +
              ", got " + std::to_string(num_spans ? span_sample[num_spans - 1] : -1));
}

// The queries of one query tile that lie in one span. x_union / x_intersect: the last key
// visible to some / to every query of the segment, before excluding noise spans; see
// tile_metadata.
struct Segment {
  int64_t sample_start, x_union, x_intersect;
  int64_t noise_before_sample_start, noise_before_union_end;
  int64_t own_noise_begin;  // first token of the span if it is noise, else -1
};

using TileMetadataResult =
    std::tuple<py::array_t<int32_t>, py::array_t<int32_t>, py::array_t<int32_t>,
               py::array_t<int32_t>, py::array_t<int32_t>, py::array_t<int32_t>>;

// Per query tile, the key tiles with at least one visible (q, k) pair (CSR), whether the
// whole tile rectangle is visible and in bounds, and the transpose for dk/dv.
//
// Within one span p of sample s (start ss), query q sees keys [ss, x(q)] except the noise
// spans of s other than p, with x(q) = q (causal p) or end(p) - 1 (full / noise p). So for
// the segment [a, b) of a query tile inside p, the union of those key sets is
// [ss, x_union] minus noise and the intersection is [ss, x_intersect] minus noise, with
// x_union = b - 1 or end(p) - 1 and x_intersect = a or end(p) - 1. A prefix count of noise
// tokens makes the test per (segment, key tile) O(1); a key tile is visible if any
// segment sees it and full if every segment sees all of it.
TileMetadataResult tile_metadata(const CArray<int32_t>& cu_array, const CArray<int32_t>& bounds_array,
                                 const CArray<int32_t>& modes_array,
                                 const CArray<int32_t>& span_sample_array, int64_t block_q,
                                 int64_t block_k) {
  const int32_t* cu = vector_data(cu_array, "cu_seqlens");
  const int32_t* bounds = vector_data(bounds_array, "span_bounds");
  const int32_t* modes = vector_data(modes_array, "span_modes");
  const int32_t* span_sample = vector_data(span_sample_array, "span_sample");
  REQUIRE(cu_array.shape(0) >= 1, "cu_seqlens must hold at least one entry (S + 1 with S >= 0)");
  REQUIRE(bounds_array.shape(0) >= 1, "span_bounds must hold at least one entry (P + 1 with P >= 0)");
  const int64_t num_samples = cu_array.shape(0) - 1;
  const int64_t num_spans = bounds_array.shape(0) - 1;
  REQUIRE(modes_array.shape(0) == num_spans,
          "span_modes must have one entry per span (" + std::to_string(num_spans) + "), got " +
              std::to_string(modes_array.shape(0)));
  REQUIRE(span_sample_array.shape(0) == num_spans,
          "span_sample must have one entry per span (" + std::to_string(num_spans) + "), got " +
              std::to_string(span_sample_array.shape(0)));
  REQUIRE(block_q >= 1, "block_q must be >= 1, got " + std::to_string(block_q));
  REQUIRE(block_k >= 1, "block_k must be >= 1, got " + std::to_string(block_k));
  check_layout(cu, num_samples, bounds, modes, span_sample, num_spans);

  const int64_t total = cu[num_samples];
  // A tile longer than the pack acts like one of T + 1 tokens (one partial tile); clamping
  // keeps the int64 tile arithmetic below from overflowing for absurd block sizes.
  block_q = std::min(block_q, total + 1);
  block_k = std::min(block_k, total + 1);
  const int64_t num_q_tiles = (total + block_q - 1) / block_q;
  const int64_t num_k_tiles = (total + block_k - 1) / block_k;
  std::vector<int32_t> q_tile_ptr(num_q_tiles + 1, 0), k_tile_idx, k_tile_full;
  std::vector<int32_t> k_tile_ptr(num_k_tiles + 1, 0);
  std::vector<int32_t> q_tile_idx, q_tile_full;
  bool too_many = false;
  {
    py::gil_scoped_release release;
    // noise_prefix[p]: noise tokens before span p. noise_before(t, p) counts noise tokens
    // in [0, t) for t inside span p (its end included).
    std::vector<int64_t> noise_prefix(num_spans + 1, 0);
    for (int64_t p = 0; p < num_spans; ++p)
      noise_prefix[p + 1] = noise_prefix[p] + (modes[p] == kNoise ? bounds[p + 1] - bounds[p] : 0);
    auto noise_before = [&](int64_t t, int64_t p) {
      return noise_prefix[p] + (modes[p] == kNoise ? t - bounds[p] : 0);
    };
    // key_noise[j]: noise tokens before key tile j (clamped to T), one sweep over spans.
    std::vector<int64_t> key_noise(num_k_tiles + 1, 0);
    for (int64_t j = 0, p = 0; j <= num_k_tiles; ++j) {
      const int64_t t = std::min(j * block_k, total);
      while (p + 1 < num_spans && bounds[p + 1] <= t) ++p;
      key_noise[j] = num_spans ? noise_before(t, p) : 0;
    }
    std::vector<int64_t> first_span_of_sample(num_samples, 0);
    for (int64_t p = num_spans - 1; p >= 0; --p) first_span_of_sample[span_sample[p]] = p;

    std::vector<Segment> segments;
    int64_t span_at_q0 = 0;
    for (int64_t i = 0; i < num_q_tiles; ++i) {
      const int64_t q0 = i * block_q, q1 = std::min(q0 + block_q, total);
      while (bounds[span_at_q0 + 1] <= q0) ++span_at_q0;
      segments.clear();
      int64_t first_key_tile = std::numeric_limits<int64_t>::max(), last_key_tile = -1;
      for (int64_t p = span_at_q0; p < num_spans && bounds[p] < q1; ++p) {
        const int64_t a = std::max<int64_t>(q0, bounds[p]), b = std::min<int64_t>(q1, bounds[p + 1]);
        const int64_t end = bounds[p + 1];
        const int64_t s = span_sample[p];
        const bool causal = modes[p] == kCausal;
        Segment seg;
        seg.sample_start = cu[s];
        seg.x_union = causal ? b - 1 : end - 1;
        seg.x_intersect = causal ? a : end - 1;
        seg.noise_before_sample_start = noise_prefix[first_span_of_sample[s]];
        seg.noise_before_union_end = noise_before(seg.x_union + 1, p);
        seg.own_noise_begin = modes[p] == kNoise ? bounds[p] : -1;
        segments.push_back(seg);
        first_key_tile = std::min(first_key_tile, seg.sample_start / block_k);
        last_key_tile = std::max(last_key_tile, seg.x_union / block_k);
      }
      const bool q_in_bounds = q0 + block_q <= total;
      for (int64_t j = first_key_tile; j <= last_key_tile; ++j) {
        const int64_t k0 = j * block_k, k_last = k0 + block_k - 1;
        bool any = false, full = q_in_bounds && k_last < total;
        for (const Segment& seg : segments) {
          const int64_t lo = std::max(k0, seg.sample_start), hi = std::min(k_last, seg.x_union);
          if (lo > hi) {
            full = false;
            continue;
          }
          // Noise is monotone in t, so noise in [lo, hi] follows from the clamped ends.
          const int64_t noise = std::min(key_noise[j + 1], seg.noise_before_union_end) -
                                std::max(key_noise[j], seg.noise_before_sample_start);
          const int64_t own = seg.own_noise_begin < 0
                                  ? 0 : std::max<int64_t>(0, hi - std::max(lo, seg.own_noise_begin) + 1);
          any = any || (hi - lo + 1) - (noise - own) > 0;
          if (full) {
            const bool inside = k0 >= seg.sample_start && k_last <= seg.x_intersect;
            const int64_t own_tile = seg.own_noise_begin < 0
                ? 0 : std::max<int64_t>(0, k_last - std::max(k0, seg.own_noise_begin) + 1);
            full = inside && key_noise[j + 1] - key_noise[j] == own_tile;
          }
        }
        if (any) {
          k_tile_idx.push_back(static_cast<int32_t>(j));
          k_tile_full.push_back(full ? 1 : 0);
          ++k_tile_ptr[j + 1];
        }
      }
      if (k_tile_idx.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
        too_many = true;
        break;
      }
      q_tile_ptr[i + 1] = static_cast<int32_t>(k_tile_idx.size());
    }

    if (!too_many) {
      // Transpose: rows are visited in ascending order, so each column's query tiles are too.
      for (int64_t j = 0; j < num_k_tiles; ++j) k_tile_ptr[j + 1] += k_tile_ptr[j];
      std::vector<int32_t> cursor(k_tile_ptr.begin(), k_tile_ptr.end() - 1);
      q_tile_idx.resize(k_tile_idx.size());
      q_tile_full.resize(k_tile_idx.size());
      for (int64_t i = 0; i < num_q_tiles; ++i)
        for (int32_t e = q_tile_ptr[i]; e < q_tile_ptr[i + 1]; ++e) {
          const int32_t slot = cursor[k_tile_idx[e]]++;
          q_tile_idx[slot] = static_cast<int32_t>(i);
          q_tile_full[slot] = k_tile_full[e];
        }
    }
  }
  REQUIRE(!too_many, "more than 2**31 - 1 visible tiles: use larger block_q / block_k");
  return {to_numpy(q_tile_ptr), to_numpy(k_tile_idx), to_numpy(k_tile_full),
          to_numpy(k_tile_ptr), to_numpy(q_tile_idx), to_numpy(q_tile_full)};
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "C++ host helpers of unimrg_fast.packing (use that module, not this one).";
  m.def("pack_first_fit_decreasing", &pack_first_fit_decreasing, py::arg("lengths"),
        py::arg("max_tokens"), py::arg("max_packs") = 0,
        "int64[n] pack per sample (first-fit decreasing); -1 overflow, -2 longer than max_tokens.");
  m.def("tile_metadata", &tile_metadata, py::arg("cu_seqlens"), py::arg("span_bounds"),
        py::arg("span_modes"), py::arg("span_sample"), py::arg("block_q"), py::arg("block_k"),
        "(q_tile_ptr, k_tile_idx, k_tile_full, k_tile_ptr, q_tile_idx, q_tile_full), int32.");
}
