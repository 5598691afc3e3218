// 4x4 pose arithmetic on 16-lane vectors (GCC vector extensions), shared by the kernel sources: a pose's 16
// entries are one vector (AVX-512: one register in float, two in double), and a 4x4 product is four
// multiply-adds of lane permutations of the two matrices (AVX-512 / AVX2 permutes, as -march allows).

#ifndef CAPSULE_OPS_POSE_MATH_H_
#define CAPSULE_OPS_POSE_MATH_H_

#include <cstdint>
#include <cstring>

namespace capsule_ops {

constexpr int kSide = 4;  // a pose is 4x4
constexpr int kEntries = kSide * kSide;

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float Vec __attribute__((vector_size(kEntries * sizeof(float))));
  typedef int32_t Mask __attribute__((vector_size(kEntries * sizeof(float))));
};
template <>
struct Lanes<double> {
  typedef double Vec __attribute__((vector_size(kEntries * sizeof(double))));
  typedef int64_t Mask __attribute__((vector_size(kEntries * sizeof(double))));
};

template <typename T>
using Vec = typename Lanes<T>::Vec;

template <typename T>
inline Vec<T> Load(const T* source) {
  Vec<T> value;
  std::memcpy(&value, source, sizeof(value));
  return value;
}

template <typename T>
inline void Store(T* target, const Vec<T>& value) {
  std::memcpy(target, &value, sizeof(value));
}

template <typename T>
inline T HorizontalSum(const Vec<T>& value) {
  T total = 0;
  for (int h = 0; h < kEntries; ++h) total += value[h];
  return total;
}

// A constant lane permutation: lane h takes lane f(h) (entry h = 4 * row + column).
template <typename T, typename F>
inline Vec<T> Permute(const Vec<T>& value, F f) {
  typedef typename Lanes<T>::Mask Mask;
  const Mask mask = {f(0), f(1), f(2),  f(3),  f(4),  f(5),  f(6),  f(7),
                     f(8), f(9), f(10), f(11), f(12), f(13), f(14), f(15)};
  return __builtin_shuffle(value, mask);
}

// (a @ b)[r, c] = sum_k a[r, k] b[k, c]: lane 4r+c gets a[4r+k] * b[4k+c], k = 0..3.
template <typename T, int K>
inline Vec<T> ProductTerm(const Vec<T>& a, const Vec<T>& b) {
  return Permute<T>(a, [](int h) { return (h & ~3) + K; }) * Permute<T>(b, [](int h) { return 4 * K + (h & 3); });
}

template <typename T>
inline Vec<T> Product(const Vec<T>& a, const Vec<T>& b) {
  return ProductTerm<T, 0>(a, b) + ProductTerm<T, 1>(a, b) + ProductTerm<T, 2>(a, b) + ProductTerm<T, 3>(a, b);
}

// (g @ w^T)[r, k] = sum_c g[r, c] w[k, c]: lane 4r+k gets g[4r+c] * w[4k+c], c = 0..3.
template <typename T, int C>
inline Vec<T> TransposedRightTerm(const Vec<T>& g, const Vec<T>& w) {
  return Permute<T>(g, [](int h) { return (h & ~3) + C; }) * Permute<T>(w, [](int h) { return 4 * (h & 3) + C; });
}

// (m^T @ g)[k, c] = sum_r m[r, k] g[r, c]: lane 4k+c gets m[4r+k] * g[4r+c], r = 0..3.
template <typename T, int R>
inline Vec<T> TransposedLeftTerm(const Vec<T>& m, const Vec<T>& g) {
  return Permute<T>(m, [](int h) { return 4 * R + (h >> 2); }) * Permute<T>(g, [](int h) { return 4 * R + (h & 3); });
}

// A pose's lane permutations that a product with it on the left needs, made once for the many right factors
// it meets (a position's child pose and the O weight matrices of its parent types).
template <typename T>
struct LeftPose {
  Vec<T> rows[kSide];     // rows[k], lane 4r+c: a[4r+k]      ((a @ b) = sum_k rows[k] * b's row k, spread)
  Vec<T> columns[kSide];  // columns[r], lane 4k+c: a[4r+k]   ((a^T @ g) = sum_r columns[r] * g's row r, spread)

  LeftPose() = default;
  explicit LeftPose(const Vec<T>& a) {
    Set<0>(a), Set<1>(a), Set<2>(a), Set<3>(a);
  }
  template <int K>
  void Set(const Vec<T>& a) {
    rows[K] = Permute<T>(a, [](int h) { return (h & ~3) + K; });
    columns[K] = Permute<T>(a, [](int h) { return 4 * K + (h >> 2); });
  }
};

// b's row k in every row: lane 4r+c gets b[4k+c].
template <typename T, int K>
inline Vec<T> SpreadRow(const Vec<T>& b) {
  return Permute<T>(b, [](int h) { return 4 * K + (h & 3); });
}

// a @ b with a's permutations made beforehand.
template <typename T>
inline Vec<T> Product(const LeftPose<T>& a, const Vec<T>& b) {
  return a.rows[0] * SpreadRow<T, 0>(b) + a.rows[1] * SpreadRow<T, 1>(b) + a.rows[2] * SpreadRow<T, 2>(b) +
         a.rows[3] * SpreadRow<T, 3>(b);
}

// a^T @ g with a's permutations made beforehand.
template <typename T>
inline Vec<T> TransposedLeftProduct(const LeftPose<T>& a, const Vec<T>& g) {
  return a.columns[0] * SpreadRow<T, 0>(g) + a.columns[1] * SpreadRow<T, 1>(g) + a.columns[2] * SpreadRow<T, 2>(g) +
         a.columns[3] * SpreadRow<T, 3>(g);
}

// One butterfly level of SumEach: lanes [0, 8) from x, [8, 16) from y; each group of 2H lanes (one vector's
// entries still to be summed) is folded to H lanes.
template <typename T, int H>
inline Vec<T> FoldPair(const Vec<T>& x, const Vec<T>& y) {
  typedef typename Lanes<T>::Mask Mask;
  constexpr int kHalf = kEntries / 2;
  auto low = [](int l) { return (l < kHalf ? 0 : kEntries) + (l % kHalf) / H * 2 * H + l % H; };
  const Mask first = {low(0), low(1), low(2),  low(3),  low(4),  low(5),  low(6),  low(7),
                      low(8), low(9), low(10), low(11), low(12), low(13), low(14), low(15)};
  return __builtin_shuffle(x, y, first) + __builtin_shuffle(x, y, first + H);
}

// s[j] = the sum of x[j]'s 16 lanes, for 16 vectors x (overwritten): a butterfly of two-source shuffles, about
// 2 per vector instead of a horizontal sum's 15 lane moves each.
template <typename T>
inline Vec<T> SumEach(Vec<T>* x) {
  for (int k = 0; k < 8; ++k) x[k] = FoldPair<T, 8>(x[2 * k], x[2 * k + 1]);
  for (int k = 0; k < 4; ++k) x[k] = FoldPair<T, 4>(x[2 * k], x[2 * k + 1]);
  for (int k = 0; k < 2; ++k) x[k] = FoldPair<T, 2>(x[2 * k], x[2 * k + 1]);
  return FoldPair<T, 1>(x[0], x[1]);
}

}  // namespace capsule_ops

#endif  // CAPSULE_OPS_POSE_MATH_H_
