// One pass over a rank's flat shard buffers computing every raw sum of docs/METRICS.md §Raw sums
// per parameter group: the fused CPU kernel behind opt_study/measure/fused_sums.py.
//
// Contract (fused_sums.py checks the inputs; this file trusts them):
//   opt_study_fused_sums(mask, v, n, runs, n_runs, n_groups, out) adds to out[group][k]
//   (float64, row-major [n_groups, 17]) the sum SUM_NAMES[k] (sums.py) over each run.
//   v: 7 pointers to fp32 arrays of n elements, in Fragment field order (x, g, delta, g_plus,
//      x0, delta_prev, g_prev); a vector whose bit is not in `mask` is never read (may be null).
//   mask: bits G=1, D=2, GP=4, X0=8, DP=16, GPR=32 (x is always read).
//   runs: int64 [n_runs][3] of (group, start, stop), 0 <= start <= stop <= n, group < n_groups.
//   A column whose operands are not all in `mask` is left as it is (the caller marks it NaN).
// Plain C ABI and no torch headers: the build takes seconds, not the ~30 s torch/extension.h
// costs, and the caller (ctypes) releases the GIL during the call.
//
// Arithmetic, identical on every x86-64 ISA (no fast-math, -ffp-contract=off, fixed lanes):
// every product (and the differences x − x0, g⁺ − g) is rounded to fp32 (no FMA); products are
// summed in LANES fp32 lanes, element i of a run going to lane (i − start) mod LANES, for BLOCK
// elements (BLOCK / LANES = 32 terms per lane); each block's lanes are then added, per lane, to
// float64 accumulators, which are summed over lanes in lane order at the end of a run.
// Error per block ≤ γ_33·Σ|a_i b_i| (32 additions plus the product's rounding; γ_k =
// k·u/(1 − k·u), u = 2^-24; Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
// §3.1), nothing of that order is added in float64, so the total's error has the scale-aware
// form of docs/METRICS.md's tolerances (γ_33 ≈ 2e-6 worst case, ~√32·u typical) and does not grow
// with the shard size.
// The generic vector types are lowered to whatever SIMD the running CPU has (target_clones picks
// AVX2 or the x86-64 baseline at load time), and each lane's sequence of operations is the same
// on every ISA: results are bit-for-bit reproducible across machines (checked: the SSE2, AVX2 and
// AVX-512+FMA builds agree exactly).
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int LANES = 8;
constexpr int64_t BLOCK = 256;  // elements per fp32 partial sum flushed to float64 (32 per lane)
constexpr int N_SUMS = 17;      // len(sums.SUM_NAMES)
constexpr int N_VECS = 7;       // len(sums.VECTOR_NAMES)

// Presence bits of the optional vectors (x is always present).
constexpr unsigned G = 1, D = 2, GP = 4, X0 = 8, DP = 16, GPR = 32;
constexpr unsigned N_MASKS = 64;  // masks are in [0, N_MASKS)

// Column of each sum in the result: sums.SUM_NAMES order.
enum Sum : int {
  SQ_GRAD, SQ_GRAD_PROBE, SQ_UPDATE, SQ_PARAM, SQ_DIST_INIT, IP_GRAD_UPDATE, IP_PROBE_UPDATE,
  SQ_GRAD_DIFF, IP_PARAM_UPDATE, IP_PARAM_GRAD, IP_UPDATE_PREV, IP_GRAD_PREV, SQ_UPDATE_PREV,
  SQ_GRAD_PREV, ABS_GRAD_PARAM, ABS_PROBE_PARAM, ABS_PROBE_UPDATE,
};

typedef float vf __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));
typedef double vd __attribute__((vector_size(LANES * sizeof(double))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

// |v| elementwise, exact: the sign bit cleared (a cast between same-size vectors reinterprets).
__attribute__((always_inline)) inline vf vabs(vf v) { return (vf)((vi)v & 0x7fffffff); }

// Which sums a presence mask can compute: the operands of sums._TERMS, all present.
constexpr bool has(unsigned m, int k) {
  switch (k) {
    case SQ_GRAD: return m & G;
    case SQ_GRAD_PROBE: return m & GP;
    case SQ_UPDATE: return m & D;
    case SQ_PARAM: return true;
    case SQ_DIST_INIT: return m & X0;
    case IP_GRAD_UPDATE: return (m & G) && (m & D);
    case IP_PROBE_UPDATE: return (m & GP) && (m & D);
    case SQ_GRAD_DIFF: return (m & GP) && (m & G);
    case IP_PARAM_UPDATE: return m & D;
    case IP_PARAM_GRAD: return m & G;
    case IP_UPDATE_PREV: return (m & D) && (m & DP);
    case IP_GRAD_PREV: return (m & G) && (m & GPR);
    case SQ_UPDATE_PREV: return m & DP;
    case SQ_GRAD_PREV: return m & GPR;
    case ABS_GRAD_PARAM: return m & G;
    case ABS_PROBE_PARAM: return m & GP;
    case ABS_PROBE_UPDATE: return (m & GP) && (m & D);
  }
  return false;
}

// The LANES elements at p (unaligned), or the last `rem` < LANES of a run padded with zeros,
// whose products add exactly 0.
__attribute__((always_inline)) inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline vf load_tail(const float* p, int64_t rem) {
  vf v = {};
  std::memcpy(&v, p, rem * sizeof(float));
  return v;
}

// Adds the products of LANES elements to the fp32 lane accumulators of every sum mask M computes.
// always_inline: the body is compiled inside each ISA clone of run_all below.
template <unsigned M>
__attribute__((always_inline)) inline void step(vf (&a)[N_SUMS], vf x, vf g, vf d, vf gp, vf x0,
                                                vf dp, vf gpr) {
  if constexpr (has(M, SQ_GRAD)) a[SQ_GRAD] += g * g;
  if constexpr (has(M, SQ_GRAD_PROBE)) a[SQ_GRAD_PROBE] += gp * gp;
  if constexpr (has(M, SQ_UPDATE)) a[SQ_UPDATE] += d * d;
  a[SQ_PARAM] += x * x;
  if constexpr (has(M, SQ_DIST_INIT)) { vf dx = x - x0; a[SQ_DIST_INIT] += dx * dx; }
  if constexpr (has(M, IP_GRAD_UPDATE)) a[IP_GRAD_UPDATE] += g * d;
  if constexpr (has(M, IP_PROBE_UPDATE)) a[IP_PROBE_UPDATE] += gp * d;
  if constexpr (has(M, SQ_GRAD_DIFF)) { vf dg = gp - g; a[SQ_GRAD_DIFF] += dg * dg; }
  if constexpr (has(M, IP_PARAM_UPDATE)) a[IP_PARAM_UPDATE] += x * d;
  if constexpr (has(M, IP_PARAM_GRAD)) a[IP_PARAM_GRAD] += x * g;
  if constexpr (has(M, IP_UPDATE_PREV)) a[IP_UPDATE_PREV] += d * dp;
  if constexpr (has(M, IP_GRAD_PREV)) a[IP_GRAD_PREV] += g * gpr;
  if constexpr (has(M, SQ_UPDATE_PREV)) a[SQ_UPDATE_PREV] += dp * dp;
  if constexpr (has(M, SQ_GRAD_PREV)) a[SQ_GRAD_PREV] += gpr * gpr;
  if constexpr (has(M, ABS_GRAD_PARAM)) a[ABS_GRAD_PARAM] += vabs(g) * vabs(x);
  if constexpr (has(M, ABS_PROBE_PARAM)) a[ABS_PROBE_PARAM] += vabs(gp) * vabs(x);
  if constexpr (has(M, ABS_PROBE_UPDATE)) a[ABS_PROBE_UPDATE] += vabs(gp) * vabs(d);
}

// Elements [lo, hi) of the vectors into acc (float64 lanes), in blocks of BLOCK elements.
// v[k] is null for a vector that is absent: M may still name it (see KERNELS), and the block
// then reads ZEROS instead, whose products are 0 and whose sums the caller never reports.
alignas(64) const float ZEROS[BLOCK] = {};

template <unsigned M>
__attribute__((always_inline)) inline void run_range(const float* const* v, int64_t lo,
                                                     int64_t hi, vd (&acc)[N_SUMS]) {
  const unsigned bits[N_VECS] = {0, G, D, GP, X0, DP, GPR};
  for (int64_t b = lo; b < hi; b += BLOCK) {
    const int64_t len = std::min(hi - b, BLOCK);
    const float* p[N_VECS];
    for (int k = 0; k < N_VECS; ++k) p[k] = v[k] ? v[k] + b : ZEROS;
    vf a[N_SUMS];
    for (auto& t : a) t = vf{};
    // a vector M leaves out is never loaded: `bits[k] && !(M & bits[k])` is known at compile time
    auto at = [&](int k, int64_t j, int64_t rem) __attribute__((always_inline)) {
      if (bits[k] && !(M & bits[k])) return vf{};
      return rem < LANES ? load_tail(p[k] + j, rem) : load(p[k] + j);
    };
    int64_t j = 0;
    for (; j + LANES <= len; j += LANES)
      step<M>(a, at(0, j, LANES), at(1, j, LANES), at(2, j, LANES), at(3, j, LANES),
              at(4, j, LANES), at(5, j, LANES), at(6, j, LANES));
    if (j < len) {
      const int64_t r = len - j;
      step<M>(a, at(0, j, r), at(1, j, r), at(2, j, r), at(3, j, r), at(4, j, r), at(5, j, r),
              at(6, j, r));
    }
    for (int k = 0; k < N_SUMS; ++k)
      if (has(M, k)) acc[k] += __builtin_convertvector(a[k], vd);
  }
}

// Every run with kernel M; writes only the sums whose vectors are all in `mask` (a subset of M).
template <unsigned M>
__attribute__((always_inline)) inline void run_all_m(unsigned mask, const float* const* v,
                                                     const int64_t* runs, int64_t n_runs,
                                                     double* out) {
  for (int64_t r = 0; r < n_runs; ++r) {
    const int64_t group = runs[3 * r], lo = runs[3 * r + 1], hi = runs[3 * r + 2];
    vd acc[N_SUMS];
    for (auto& t : acc) t = vd{};
    run_range<M>(v, lo, hi, acc);
    for (int k = 0; k < N_SUMS; ++k) {
      if (!has(M, k) || !has(mask, k)) continue;
      double s = 0.0;
      for (int l = 0; l < LANES; ++l) s += acc[k][l];  // lane order: the same on every ISA
      out[group * N_SUMS + k] += s;
    }
  }
}

// The compiled kernels, by the vectors they read: the step hook's patterns (norms; measured
// without and with Δ_{t−1}, g_{t−1}; with the probe) and every vector. A mask runs on the first
// kernel that covers it, absent vectors read as zeros: 5 kernels instead of all 64 masks keep
// the build at seconds, and a pattern outside the list only costs reading a zero block from L1.
constexpr unsigned KERNELS[] = {G | D, G | D | X0, G | D | X0 | DP | GPR, G | D | GP | X0,
                                G | D | GP | X0 | DP | GPR};

// One clone per ISA, chosen once by the dynamic loader (GNU ifunc); every kernel is inlined into
// it and so compiled for that ISA. Elsewhere (other compilers or CPUs) the portable build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
__attribute__((target_clones("avx2", "default")))
#endif
void run_all(unsigned mask, const float* const* v, const int64_t* runs, int64_t n_runs,
             double* out) {
  if ((mask & ~KERNELS[0]) == 0) return run_all_m<KERNELS[0]>(mask, v, runs, n_runs, out);
  if ((mask & ~KERNELS[1]) == 0) return run_all_m<KERNELS[1]>(mask, v, runs, n_runs, out);
  if ((mask & ~KERNELS[2]) == 0) return run_all_m<KERNELS[2]>(mask, v, runs, n_runs, out);
  if ((mask & ~KERNELS[3]) == 0) return run_all_m<KERNELS[3]>(mask, v, runs, n_runs, out);
  return run_all_m<KERNELS[4]>(mask, v, runs, n_runs, out);
}

// Elements [b, b + len) of the fragments laid back to back (off: n_frags + 1 prefix offsets, the
// flat layout of shards.FlatShard): a pointer into the fragment that holds them all (the common
// case), or `dst` with them gathered there from the several fragments they span.
inline const float* gather(const float* const* frag, const int64_t* off, int64_t n_frags,
                           int64_t b, int64_t len, float* dst) {
  int64_t i = std::upper_bound(off, off + n_frags + 1, b) - off - 1;  // off[i] <= b < off[i + 1]
  if (b + len <= off[i + 1]) return frag[i] + (b - off[i]);
  for (float* out = dst; len > 0; ++i) {
    const int64_t take = std::min(len, off[i + 1] - b);  // 0 for an empty fragment
    if (take > 0) std::memcpy(out, frag[i] + (b - off[i]), take * sizeof(float));
    out += take, b += take, len -= take;
  }
  return dst;
}

// The every-step norms straight from the engine's fragments (opt_study_fragment_sums below):
// each run is cut into the same BLOCKs as run_all_m's (one that spans fragments gathered into L1), and each sum
// accumulated in the same lanes with the same operations as step<M>, so every sum is bit-for-bit
// the flat kernel's on flattened copies. Only these two or three sums: 1.6x faster than
// run_range, whose kernels also form every other sum of the vectors they read.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
__attribute__((target_clones("avx2", "default")))
#endif
void fragment_all(bool advance, const float* const* frag, const int64_t* off, int64_t n_frags,
                  float* kept, const int64_t* runs, int64_t n_runs, double* out) {
  alignas(64) float buf[BLOCK];
  const int cols[2][2] = {{SQ_GRAD, -1}, {SQ_UPDATE, SQ_PARAM}};  // the sums each mode writes
  for (int64_t r = 0; r < n_runs; ++r) {
    const int64_t group = runs[3 * r], lo = runs[3 * r + 1], hi = runs[3 * r + 2];
    vd acc[N_SUMS];
    for (auto& t : acc) t = vd{};
    for (int64_t b = lo; b < hi; b += BLOCK) {
      const int64_t len = std::min(hi - b, BLOCK);
      const float* live = gather(frag, off, n_frags, b, len, buf);
      // each sum lane by lane exactly as step<M> forms it (the other sums are not computed)
      int64_t j = 0;
      if (advance) {  // Δ = x_{t+1} − x_t (one fp32 subtraction, as torch's sub_), then x_t ← x_{t+1}
        float* x = kept + b;
        vf au = {}, ax = {};
        for (; j + LANES <= len; j += LANES) {
          const vf xt = load(x + j), d = load(live + j) - xt;
          au += d * d, ax += xt * xt;
        }
        if (j < len) {
          const vf xt = load_tail(x + j, len - j), d = load_tail(live + j, len - j) - xt;
          au += d * d, ax += xt * xt;
        }
        acc[SQ_UPDATE] += __builtin_convertvector(au, vd);
        acc[SQ_PARAM] += __builtin_convertvector(ax, vd);
        std::memcpy(x, live, len * sizeof(float));
      } else {  // the fragments are g: ‖g‖²
        vf a = {};
        for (; j + LANES <= len; j += LANES) {
          const vf g = load(live + j);
          a += g * g;
        }
        if (j < len) {
          const vf g = load_tail(live + j, len - j);
          a += g * g;
        }
        acc[SQ_GRAD] += __builtin_convertvector(a, vd);
      }
    }
    for (int c = 0; c < (advance ? 2 : 1); ++c) {
      const int k = cols[advance][c];
      double s = 0.0;
      for (int l = 0; l < LANES; ++l) s += acc[k][l];  // lane order, as run_all_m
      out[group * N_SUMS + k] += s;
    }
  }
}

}  // namespace

// The every-step norms of an unmeasured step without copies (fused_sums.py: grad_sq, advance).
// frag: n_frags pointers to fp32 fragments; off: their n_frags + 1 prefix offsets (off[n_frags]
// = n); runs: as opt_study_fused_sums's, over that layout. mode 0: out[group][SQ_GRAD] += Σ frag²
// (kept unused). mode 1: the fragments are x_{t+1}, kept (n fp32) holds x_t: adds Σ(x_{t+1} −
// x_t)² to SQ_UPDATE and Σ x_t² to SQ_PARAM, then writes x_{t+1} into kept. Returns 0, -1 for a
// bad mode or layout, -(2 + r) for run r out of range; nothing is written then.
extern "C" int64_t opt_study_fragment_sums(int64_t mode, const float* const* frag,
                                           const int64_t* off, int64_t n_frags, float* kept,
                                           const int64_t* runs, int64_t n_runs,
                                           int64_t n_groups, double* out) {
  if (mode < 0 || mode > 1 || n_frags < 0 || off[0] != 0 || (mode == 1 && !kept)) return -1;
  for (int64_t i = 0; i < n_frags; ++i)
    if (off[i + 1] < off[i]) return -1;
  const int64_t n = off[n_frags];
  for (int64_t r = 0; r < n_runs; ++r) {
    const int64_t g = runs[3 * r], lo = runs[3 * r + 1], hi = runs[3 * r + 2];
    if (g < 0 || g >= n_groups || lo < 0 || lo > hi || hi > n) return -(2 + r);
  }
  fragment_all(mode == 1, frag, off, n_frags, kept, runs, n_runs, out);
  return 0;
}

// The C entry point, called through ctypes (fused_sums.py checks dtypes, devices, contiguity and
// lengths; this checks what could make it read out of bounds). Returns 0, or -1 for a bad mask
// or -(2 + r) when run r is out of range; `out` is then untouched.
extern "C" int64_t opt_study_fused_sums(int64_t mask, const float* const* v, int64_t n,
                                        const int64_t* runs, int64_t n_runs, int64_t n_groups,
                                        double* out) {
  if (mask < 0 || mask >= static_cast<int64_t>(N_MASKS)) return -1;
  for (int64_t r = 0; r < n_runs; ++r) {
    const int64_t g = runs[3 * r], lo = runs[3 * r + 1], hi = runs[3 * r + 2];
    if (g < 0 || g >= n_groups || lo < 0 || lo > hi || hi > n) return -(2 + r);
  }
  const unsigned bits[N_VECS] = {0, G, D, GP, X0, DP, GPR};
  const float* read[N_VECS];  // null: absent, never dereferenced (run_range reads ZEROS)
  for (int k = 0; k < N_VECS; ++k) read[k] = (k == 0 || (mask & bits[k])) ? v[k] : nullptr;
  run_all(static_cast<unsigned>(mask), read, runs, n_runs, out);
  return 0;
}

// Layout constants, for fused_sums.py to check against its own.
extern "C" int64_t opt_study_fused_sums_layout(int64_t i) {
  const int64_t values[] = {N_SUMS, N_VECS, LANES, BLOCK};
  return i >= 0 && i < 4 ? values[i] : -1;
}
