// Fused vote contractions of EM routing (em_routing.py, `_VoteContractions`), CPU, float and double.
//
// EM routing touches the votes V [NP, O, C, 16] (parent-major: NP parent positions, O parent types,
// C children, 16 pose entries) in three ways, each one pass over V per (parent position, type) block:
//   CapsCentredSums      the M-step: the weighted mean c = sum_i r_i V_i / (sum_i r_i + eps), the centred
//                        squares sum_i r_i (V_i - c)^2 (two passes over the block, which stays in L1: no
//                        E[V^2] - c^2 cancellation in float32) and the mass sum_i r_i;
//   CapsWeightedSums     sum_i r_i (V_i - z), sum_i r_i (V_i - z)^2 and sum_i r_i about a given centre z
//                        (the gradient of the quadratic forms);
//   CapsQuadraticForms   sum_h (V_ih - z_h) a_h + (V_ih - z_h)^2 b_h + c per child (the E-step's log
//                        numerator -sum_h (V_h - mu_h)^2 / (2 sigma_h^2) + c, centred on mu);
//   CapsVotesGradient    dL/dV = sum_k u_ki (L_kh + 2 V_ih S_kh), the routing's rank-k votes gradient.
// The first three come in two forms: reading stored votes (input `votes` [NP, O, C, 16]), and `...FromFactors`,
// which recompute V_noi = M_ni W_oi from the poses [NP, C, 16] and weights [O, C, 16] of the layer (64
// multiply-adds per vote instead of a 64-byte read; no vote tensor is ever stored). The work is split over the
// NP * O blocks, parent position major (a position's poses stay in L1, the O weight slices in L2), with
// TensorFlow's CPU thread pool; the 16 pose entries are the vector lanes.

#include <vector>

#include "op_common.h"
#include "pose_math.h"

namespace capsule_ops {
namespace {

constexpr int kStoredCost = 4;       // sharder's cost per vote entry read from memory
constexpr int kRecomputedCost = 8;   // per entry of a recomputed vote: a 4x4 product's 64 multiply-adds / 16, x2

// Runs fn(first_block, end_block) over `blocks` blocks of `cost_per_block` on the CPU pool.
template <typename Fn>
void ForEachBlock(OpKernelContext* context, int64_t blocks, int64_t cost_per_block, Fn fn) {
  const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(workers.num_threads, workers.workers, blocks, cost_per_block, fn);
}

// Stored votes: input 0, [NP, O, C, 16].
template <typename T>
struct StoredVotes {
  static constexpr int kInputs = 1;
  static constexpr int kCostPerEntry = kStoredCost;
  const T* votes = nullptr;
  int64_t np = 0, types = 0, children = 0;

  bool Init(OpKernelContext* context) {
    const Tensor& v = context->input(0);
    if (v.dims() != 4 || v.dim_size(3) != kEntries) {
      context->CtxFailure(InvalidArgument("votes must be [NP, O, C, 16], got ", v.shape().DebugString()));
      return false;
    }
    np = v.dim_size(0), types = v.dim_size(1), children = v.dim_size(2);
    votes = v.flat<T>().data();
    return true;
  }
  struct Block {
    const T* v;
    Vec<T> operator()(int64_t i) const { return Load(v + i * kEntries); }
  };
  struct Scratch {
    explicit Scratch(const StoredVotes&) {}
  };
  Block At(int64_t block, Scratch*) const { return {votes + block * children * kEntries}; }
};

// Votes recomputed from their factors: poses (input 0) [NP, C, 16] and weights (input 1) [O, C, 16].
template <typename T>
struct RecomputedVotes {
  static constexpr int kInputs = 2;
  static constexpr int kCostPerEntry = kRecomputedCost;
  const T* poses = nullptr;
  const T* weights = nullptr;
  int64_t np = 0, types = 0, children = 0;

  bool Init(OpKernelContext* context) {
    const Tensor& m = context->input(0);
    const Tensor& w = context->input(1);
    if (m.dims() != 3 || m.dim_size(2) != kEntries || w.dims() != 3 || w.dim_size(2) != kEntries ||
        w.dim_size(1) != m.dim_size(1)) {
      context->CtxFailure(InvalidArgument("poses must be [NP, C, 16] and weights [O, C, 16], got ",
                                          m.shape().DebugString(), " and ", w.shape().DebugString()));
      return false;
    }
    np = m.dim_size(0), types = w.dim_size(0), children = m.dim_size(1);
    poses = m.flat<T>().data();
    weights = w.flat<T>().data();
    return true;
  }
  struct Block {
    const Vec<T>* rows;  // the position's child poses, permuted: 4 per child (LeftPose's rows)
    const T* w;
    Vec<T> operator()(int64_t i) const {
      const Vec<T>* a = rows + kSide * i;
      const Vec<T> b = Load(w + i * kEntries);
      return a[0] * SpreadRow<T, 0>(b) + a[1] * SpreadRow<T, 1>(b) + a[2] * SpreadRow<T, 2>(b) +
             a[3] * SpreadRow<T, 3>(b);
    }
  };
  // Per shard: the current parent position's child poses with their lane permutations made once, for all O
  // types (blocks are position-major), instead of once per vote.
  struct Scratch {
    explicit Scratch(const RecomputedVotes& source) : rows(source.children * kSide) {}
    std::vector<Vec<T>> rows;
    int64_t position = -1;
  };
  Block At(int64_t block, Scratch* scratch) const {
    const int64_t n = block / types;
    if (scratch->position != n) {
      for (int64_t i = 0; i < children; ++i) {
        const LeftPose<T> pose(Load(poses + (n * children + i) * kEntries));
        for (int k = 0; k < kSide; ++k) scratch->rows[kSide * i + k] = pose.rows[k];
      }
      scratch->position = n;
    }
    return {scratch->rows.data(), weights + (block % types) * children * kEntries};
  }
};

// Checks a per-child input [NP, O or 1, C]; true when it is one factor shared by the O types.
template <typename Source>
bool CheckPerChild(OpKernelContext* context, const Tensor& x, const Source& source, bool* shared) {
  if (x.dims() != 3 || x.dim_size(0) != source.np || x.dim_size(2) != source.children ||
      (x.dim_size(1) != source.types && x.dim_size(1) != 1)) {
    context->CtxFailure(InvalidArgument("weights must be [NP, O or 1, C] = [", source.np, ", ", source.types,
                                        " or 1, ", source.children, "], got ", x.shape().DebugString()));
    return false;
  }
  *shared = x.dim_size(1) == 1 && source.types != 1;
  return true;
}

bool CheckShape(OpKernelContext* context, const Tensor& x, const TensorShape& shape, const char* name) {
  if (x.shape() == shape) return true;
  context->CtxFailure(InvalidArgument(name, " must be ", shape.DebugString(), ", got ", x.shape().DebugString()));
  return false;
}

// ---- CapsCentredSums: mean[b] = sum_i r_i V_i / (mass + eps), squares[b] = sum_i r_i (V_i - mean)^2,
//      mass[b] = sum_i r_i ----

template <typename T, typename Source>
class CentredSumsOp : public OpKernel {
 public:
  explicit CentredSumsOp(OpKernelConstruction* context) : OpKernel(context) {
    float epsilon;
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon));
    epsilon_ = epsilon;
  }

  void Compute(OpKernelContext* context) override {
    Source source;
    bool shared;
    if (!source.Init(context)) return;
    const Tensor& weights = context->input(Source::kInputs);  // [NP, O or 1, C]
    if (!CheckPerChild(context, weights, source, &shared)) return;
    const int64_t np = source.np, types = source.types, children = source.children;
    Tensor *mean, *squares, *mass;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({np, types, kEntries}), &mean));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({np, types, kEntries}), &squares));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({np, types, 1}), &mass));
    const T* r = weights.flat<T>().data();
    T *means = mean->flat<T>().data(), *sums = squares->flat<T>().data(), *masses = mass->flat<T>().data();
    const int64_t cost = 2 * children * kEntries * Source::kCostPerEntry;
    ForEachBlock(context, np * types, cost, [&](int64_t first, int64_t end) {
      std::vector<T> scratch(children * kEntries);  // the block's votes between the two passes
      typename Source::Scratch vote_scratch(source);
      for (int64_t block = first; block < end; ++block) {
        const T* r_block = r + (shared ? block / types : block) * children;
        Centre(source.At(block, &vote_scratch), r_block, children, scratch.data(), means + block * kEntries,
               sums + block * kEntries, masses + block);
      }
    });
  }

 private:
  template <typename Block>
  void Centre(const Block& votes, const T* r, int64_t children, T* scratch, T* mean_out, T* square_out,
              T* mass_out) const {
    Vec<T> sum = {};
    T mass = 0;
    for (int64_t i = 0; i < children; ++i) {
      const Vec<T> vote = votes(i);
      Store(scratch + i * kEntries, vote);
      sum += r[i] * vote;
      mass += r[i];
    }
    const Vec<T> mean = sum / (mass + epsilon_);
    Vec<T> square = {};
    for (int64_t i = 0; i < children; ++i) {
      const Vec<T> centred = Load(scratch + i * kEntries) - mean;
      square += r[i] * centred * centred;
    }
    Store(mean_out, mean);
    Store(square_out, square);
    *mass_out = mass;
  }

  T epsilon_;
};

// ---- CapsWeightedSums: about a centre z[b]: sums[b] = sum_i r_i (V_i - z), squares[b] = sum_i r_i (V_i - z)^2,
//      mass[b] = sum_i r_i ----

template <typename T, typename Source>
class WeightedSumsOp : public OpKernel {
 public:
  explicit WeightedSumsOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    Source source;
    bool shared;
    if (!source.Init(context)) return;
    const Tensor& weights = context->input(Source::kInputs);     // [NP, O or 1, C]
    const Tensor& centre = context->input(Source::kInputs + 1);  // [NP, O, 16]
    if (!CheckPerChild(context, weights, source, &shared)) return;
    const int64_t np = source.np, types = source.types, children = source.children;
    const TensorShape parent_shape({np, types, kEntries});
    if (!CheckShape(context, centre, parent_shape, "centre")) return;
    Tensor *sum, *squares, *mass;
    OP_REQUIRES_OK(context, context->allocate_output(0, parent_shape, &sum));
    OP_REQUIRES_OK(context, context->allocate_output(1, parent_shape, &squares));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({np, types, 1}), &mass));
    const T *r = weights.flat<T>().data(), *z = centre.flat<T>().data();
    T *sums = sum->flat<T>().data(), *square_sums = squares->flat<T>().data(), *masses = mass->flat<T>().data();
    ForEachBlock(context, np * types, children * kEntries * Source::kCostPerEntry, [&](int64_t first, int64_t end) {
      typename Source::Scratch vote_scratch(source);
      for (int64_t block = first; block < end; ++block) {
        const auto votes = source.At(block, &vote_scratch);
        const T* r_block = r + (shared ? block / types : block) * children;
        const Vec<T> z_block = Load(z + block * kEntries);
        Vec<T> total = {}, square = {};
        T total_mass = 0;
        for (int64_t i = 0; i < children; ++i) {
          const Vec<T> centred = votes(i) - z_block;
          const Vec<T> weighted = r_block[i] * centred;
          total += weighted;
          square += weighted * centred;
          total_mass += r_block[i];
        }
        Store(sums + block * kEntries, total);
        Store(square_sums + block * kEntries, square);
        masses[block] = total_mass;
      }
    });
  }
};

// ---- CapsQuadraticForms: forms[b, i] = sum_h d_ih a[b, h] + d_ih^2 q[b, h] + c[b], d = V[b, i] - z[b] ----

template <typename T, typename Source>
class QuadraticFormsOp : public OpKernel {
 public:
  explicit QuadraticFormsOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    Source source;
    if (!source.Init(context)) return;
    const Tensor& linear = context->input(Source::kInputs);         // [NP, O, 16]
    const Tensor& quadratic = context->input(Source::kInputs + 1);  // [NP, O, 16]
    const Tensor& constant = context->input(Source::kInputs + 2);   // [NP, O]
    const Tensor& centre = context->input(Source::kInputs + 3);     // [NP, O, 16]
    const int64_t np = source.np, types = source.types, children = source.children;
    const TensorShape parent_shape({np, types, kEntries});
    if (!CheckShape(context, linear, parent_shape, "linear") ||
        !CheckShape(context, quadratic, parent_shape, "quadratic") ||
        !CheckShape(context, constant, TensorShape({np, types}), "constant") ||
        !CheckShape(context, centre, parent_shape, "centre")) {
      return;
    }
    Tensor* forms;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({np, types, children}), &forms));
    const T *a = linear.flat<T>().data(), *q = quadratic.flat<T>().data();
    const T *c = constant.flat<T>().data(), *z = centre.flat<T>().data();
    T* out = forms->flat<T>().data();
    ForEachBlock(context, np * types, children * kEntries * Source::kCostPerEntry, [&](int64_t first, int64_t end) {
      typename Source::Scratch vote_scratch(source);
      for (int64_t block = first; block < end; ++block) {
        const auto votes = source.At(block, &vote_scratch);
        const Vec<T> a_block = Load(a + block * kEntries), q_block = Load(q + block * kEntries);
        const Vec<T> z_block = Load(z + block * kEntries);
        T* out_block = out + block * children;
        Vec<T> terms[kEntries];
        int64_t i = 0;
        for (; i + kEntries <= children; i += kEntries) {  // 16 children at a time: one butterfly of sums
          for (int j = 0; j < kEntries; ++j) {
            const Vec<T> centred = votes(i + j) - z_block;
            terms[j] = centred * (a_block + centred * q_block);
          }
          Store(out_block + i, SumEach<T>(terms) + c[block]);
        }
        for (; i < children; ++i) {
          const Vec<T> centred = votes(i) - z_block;
          out_block[i] = HorizontalSum<T>(centred * (a_block + centred * q_block)) + c[block];
        }
      }
    });
  }
};

// ---- CapsVotesGradient: grad[b, i, h] = sum_k u_k[b, i] (L_k[b, h] + 2 V[b, i, h] S_k[b, h]), stored votes ----
// The k uses come as lists (u_k [NP, O or 1, C], L_k and S_k [NP, O, 16]): no stacked or broadcast copies.

template <typename T>
class VotesGradientOp : public OpKernel {
 public:
  explicit VotesGradientOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    StoredVotes<T> source;
    if (!source.Init(context)) return;
    tensorflow::OpInputList per_child, linear_rows, square_rows;
    OP_REQUIRES_OK(context, context->input_list("per_child", &per_child));
    OP_REQUIRES_OK(context, context->input_list("linear_rows", &linear_rows));
    OP_REQUIRES_OK(context, context->input_list("square_rows", &square_rows));
    const int64_t np = source.np, types = source.types, children = source.children;
    const int rank = per_child.size();
    std::vector<const T*> u(rank), lin(rank), sq(rank);
    std::vector<bool> shared(rank);
    const TensorShape parent_shape({np, types, kEntries});
    for (int k = 0; k < rank; ++k) {
      bool is_shared;
      if (!CheckPerChild(context, per_child[k], source, &is_shared)) return;
      if (!CheckShape(context, linear_rows[k], parent_shape, "linear_rows") ||
          !CheckShape(context, square_rows[k], parent_shape, "square_rows")) {
        return;
      }
      u[k] = per_child[k].flat<T>().data(), shared[k] = is_shared;
      lin[k] = linear_rows[k].flat<T>().data(), sq[k] = square_rows[k].flat<T>().data();
    }
    // The votes' last use: their buffer takes the gradient when nothing else holds it (peak memory).
    Tensor* gradient;
    const Tensor& votes = context->input(0);
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, votes.shape(), &gradient));
    T* out = gradient->flat<T>().data();
    ForEachBlock(context, np * types, children * kEntries * rank * kStoredCost, [&](int64_t first, int64_t end) {
      for (int64_t block = first; block < end; ++block) {
        const T* v = source.votes + block * children * kEntries;  // may be `out`: each entry read, then written
        T* target = out + block * children * kEntries;
        for (int64_t i = 0; i < children; ++i) {
          Vec<T> linear = {}, square = {};
          for (int k = 0; k < rank; ++k) {
            const T weight = u[k][(shared[k] ? block / types : block) * children + i];
            linear += weight * Load(lin[k] + block * kEntries);
            square += weight * Load(sq[k] + block * kEntries);
          }
          Store(target + i * kEntries, linear + T(2) * Load(v + i * kEntries) * square);
        }
      }
    });
  }
};

// ---- Registration ----

// Sets np, types and children from the vote inputs: votes [NP, O, C, 16], or poses [NP, C, 16] and weights
// [O, C, 16] when `factored`.
absl::Status VoteDims(InferenceContext* context, bool factored, tensorflow::shape_inference::DimensionHandle* np,
                      tensorflow::shape_inference::DimensionHandle* types,
                      tensorflow::shape_inference::DimensionHandle* children) {
  ShapeHandle first, second;
  if (!factored) {
    TF_RETURN_IF_ERROR(context->WithRank(context->input(0), 4, &first));
    *np = context->Dim(first, 0), *types = context->Dim(first, 1), *children = context->Dim(first, 2);
    return absl::OkStatus();
  }
  TF_RETURN_IF_ERROR(context->WithRank(context->input(0), 3, &first));
  TF_RETURN_IF_ERROR(context->WithRank(context->input(1), 3, &second));
  *np = context->Dim(first, 0), *types = context->Dim(second, 0), *children = context->Dim(first, 1);
  return absl::OkStatus();
}

// Outputs [NP, O, 16], [NP, O, 16], [NP, O, 1] (the sums ops).
template <bool kFactored>
absl::Status SumsShape(InferenceContext* context) {
  tensorflow::shape_inference::DimensionHandle np, types, children;
  TF_RETURN_IF_ERROR(VoteDims(context, kFactored, &np, &types, &children));
  ShapeHandle parents = context->MakeShape({np, types, kEntries});
  context->set_output(0, parents);
  context->set_output(1, parents);
  context->set_output(2, context->MakeShape({np, types, 1}));
  return absl::OkStatus();
}

template <bool kFactored>
absl::Status FormsShape(InferenceContext* context) {
  tensorflow::shape_inference::DimensionHandle np, types, children;
  TF_RETURN_IF_ERROR(VoteDims(context, kFactored, &np, &types, &children));
  context->set_output(0, context->MakeShape({np, types, children}));
  return absl::OkStatus();
}

REGISTER_OP("CapsCentredSums")
    .Attr("T: {float, double}")
    .Attr("epsilon: float")  // added to the mass before the mean's divide
    .Input("votes: T")       // [NP, O, C, 16]
    .Input("weights: T")     // r, [NP, O or 1, C]
    .Output("mean: T")       // [NP, O, 16]
    .Output("squares: T")    // [NP, O, 16]
    .Output("mass: T")       // [NP, O, 1]
    .SetShapeFn(SumsShape<false>);

REGISTER_OP("CapsCentredSumsFromFactors")
    .Attr("T: {float, double}")
    .Attr("epsilon: float")
    .Input("poses: T")       // [NP, C, 16]
    .Input("transforms: T")  // [O, C, 16]
    .Input("weights: T")     // r, [NP, O or 1, C]
    .Output("mean: T")
    .Output("squares: T")
    .Output("mass: T")
    .SetShapeFn(SumsShape<true>);

REGISTER_OP("CapsWeightedSums")
    .Attr("T: {float, double}")
    .Input("votes: T")    // [NP, O, C, 16]
    .Input("weights: T")  // r, [NP, O or 1, C]
    .Input("centre: T")   // z, [NP, O, 16]
    .Output("sums: T")     // [NP, O, 16]
    .Output("squares: T")  // [NP, O, 16]
    .Output("mass: T")     // [NP, O, 1]
    .SetShapeFn(SumsShape<false>);

REGISTER_OP("CapsWeightedSumsFromFactors")
    .Attr("T: {float, double}")
    .Input("poses: T")
    .Input("transforms: T")
    .Input("weights: T")
    .Input("centre: T")
    .Output("sums: T")
    .Output("squares: T")
    .Output("mass: T")
    .SetShapeFn(SumsShape<true>);

REGISTER_OP("CapsQuadraticForms")
    .Attr("T: {float, double}")
    .Input("votes: T")      // [NP, O, C, 16]
    .Input("linear: T")     // [NP, O, 16]
    .Input("quadratic: T")  // [NP, O, 16]
    .Input("constant: T")   // [NP, O]
    .Input("centre: T")     // [NP, O, 16]
    .Output("forms: T")     // [NP, O, C]
    .SetShapeFn(FormsShape<false>);

REGISTER_OP("CapsQuadraticFormsFromFactors")
    .Attr("T: {float, double}")
    .Input("poses: T")
    .Input("transforms: T")
    .Input("linear: T")
    .Input("quadratic: T")
    .Input("constant: T")
    .Input("centre: T")
    .Output("forms: T")
    .SetShapeFn(FormsShape<true>);

REGISTER_OP("CapsVotesGradient")
    .Attr("T: {float, double}")
    .Attr("K: int >= 1")
    .Input("votes: T")            // [NP, O, C, 16]
    .Input("per_child: K * T")    // K x [NP, O or 1, C]
    .Input("linear_rows: K * T")  // K x [NP, O, 16]
    .Input("square_rows: K * T")  // K x [NP, O, 16]
    .Output("gradient: T")        // [NP, O, C, 16]
    .SetShapeFn([](InferenceContext* context) {
      context->set_output(0, context->input(0));
      return absl::OkStatus();
    });

#define REGISTER_FOR_SOURCE(T, NAME, SOURCE)                                                                 \
  REGISTER_KERNEL_BUILDER(Name("CapsCentredSums" NAME).Device(DEVICE_CPU).TypeConstraint<T>("T"),          \
                          CentredSumsOp<T, SOURCE<T>>);                                                      \
  REGISTER_KERNEL_BUILDER(Name("CapsWeightedSums" NAME).Device(DEVICE_CPU).TypeConstraint<T>("T"),         \
                          WeightedSumsOp<T, SOURCE<T>>);                                                     \
  REGISTER_KERNEL_BUILDER(Name("CapsQuadraticForms" NAME).Device(DEVICE_CPU).TypeConstraint<T>("T"),       \
                          QuadraticFormsOp<T, SOURCE<T>>);

#define REGISTER_KERNELS(T)                                                                                   \
  REGISTER_FOR_SOURCE(T, "", StoredVotes)                                                                     \
  REGISTER_FOR_SOURCE(T, "FromFactors", RecomputedVotes)                                                      \
  REGISTER_KERNEL_BUILDER(Name("CapsVotesGradient").Device(DEVICE_CPU).TypeConstraint<T>("T"), VotesGradientOp<T>);

REGISTER_KERNELS(float)
REGISTER_KERNELS(double)

}  // namespace
}  // namespace capsule_ops
