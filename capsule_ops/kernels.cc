// Fused vote contractions of EM routing (em_routing.py, `_VoteContractions`), CPU, float and double.
//
// EM routing touches the votes V [NP, O, C, 16] (parent-major: NP parent positions, O parent types,
// C children, 16 pose entries) in three ways, each a memory-bound pass over V:
//   CapsWeightedSums     sum_i r_i V_i and sum_i r_i V_i^2 (the M-step), V^2 computed on the fly, and the
//                        mass sum_i r_i;
//   CapsQuadraticForms   sum_h V_ih a_h + V_ih^2 b_h + c per child (the E-step's log numerator: its
//                        Mahalanobis term plus a per-parent constant c);
//   CapsVotesGradient    dL/dV = sum_k u_ki (L_kh + 2 V_ih S_kh), the routing's rank-k votes gradient.
// Each reads V once (TensorFlow ops need V^2 as its own tensor and one kernel per product). The work is
// split over the NP * O (parent position, type) blocks with TensorFlow's CPU thread pool; within a block
// the 16 pose entries are the vector lanes (AVX2 / AVX-512 as the build's -march allows).

#include <vector>

#include "op_common.h"

namespace capsule_ops {

constexpr int kPoseEntries = 16;  // a 4x4 pose, flattened
constexpr int kFlopsPerEntry = 4;  // cost estimate for the sharder: about 4 operations per vote entry

// Runs fn(first_block, end_block) over `blocks` blocks of `entries_per_block` vote entries on the CPU pool.
template <typename Fn>
void ForEachBlock(OpKernelContext* context, int64_t blocks, int64_t entries_per_block, Fn fn) {
  const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(workers.num_threads, workers.workers, blocks, entries_per_block * kFlopsPerEntry, fn);
}

// Checks votes [NP, O, C, 16]; sets np, types, children.
bool CheckVotes(OpKernelContext* context, const Tensor& votes, int64_t* np, int64_t* types, int64_t* children) {
  if (votes.dims() != 4 || votes.dim_size(3) != kPoseEntries) {
    context->CtxFailure(InvalidArgument("votes must be [NP, O, C, 16], got ", votes.shape().DebugString()));
    return false;
  }
  *np = votes.dim_size(0);
  *types = votes.dim_size(1);
  *children = votes.dim_size(2);
  return true;
}

// ---- CapsWeightedSums: vote_sum[b, h] = sum_i r[b, i] V[b, i, h], squared_sum[b, h] = sum_i r V^2,
//      mass[b] = sum_i r[b, i] ----

template <typename T>
class WeightedSumsOp : public OpKernel {
 public:
  explicit WeightedSumsOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& votes = context->input(0);  // [NP, O, C, 16]
    const Tensor& weights = context->input(1);  // [NP, O or 1, C]
    int64_t np, types, children;
    if (!CheckVotes(context, votes, &np, &types, &children)) return;
    OP_REQUIRES(context,
                weights.dims() == 3 && weights.dim_size(0) == np && weights.dim_size(2) == children &&
                    (weights.dim_size(1) == types || weights.dim_size(1) == 1),
                InvalidArgument("weights must be [NP, O or 1, C] for votes ", votes.shape().DebugString(),
                                ", got ", weights.shape().DebugString()));
    const int64_t weight_types = weights.dim_size(1);
    Tensor *vote_sum, *squared_sum, *mass;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({np, types, kPoseEntries}), &vote_sum));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({np, types, kPoseEntries}), &squared_sum));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({np, types, 1}), &mass));
    const T* v = votes.flat<T>().data();
    const T* r = weights.flat<T>().data();
    T* sums = vote_sum->flat<T>().data();
    T* squares = squared_sum->flat<T>().data();
    T* masses = mass->flat<T>().data();
    ForEachBlock(context, np * types, children * kPoseEntries, [&](int64_t first, int64_t end) {
      for (int64_t block = first; block < end; ++block) {
        const int64_t weight_block = weight_types == 1 ? block / types : block;
        Accumulate(v + block * children * kPoseEntries, r + weight_block * children, children,
                   sums + block * kPoseEntries, squares + block * kPoseEntries, masses + block);
      }
    });
  }

 private:
  static void Accumulate(const T* __restrict v, const T* __restrict r, int64_t children, T* __restrict sum_out,
                         T* __restrict square_out, T* __restrict mass_out) {
    T sum[kPoseEntries] = {}, square[kPoseEntries] = {};
    T mass = 0;
    for (int64_t i = 0; i < children; ++i) {
      const T weight = r[i];
      mass += weight;
      const T* __restrict vote = v + i * kPoseEntries;
#pragma omp simd
      for (int h = 0; h < kPoseEntries; ++h) {
        const T weighted = weight * vote[h];
        sum[h] += weighted;
        square[h] += weighted * vote[h];
      }
    }
    for (int h = 0; h < kPoseEntries; ++h) {
      sum_out[h] = sum[h];
      square_out[h] = square[h];
    }
    *mass_out = mass;
  }
};

// ---- CapsQuadraticForms: forms[b, i] = sum_h V[b, i, h] a[b, h] + V[b, i, h]^2 q[b, h] + c[b] ----

template <typename T>
class QuadraticFormsOp : public OpKernel {
 public:
  explicit QuadraticFormsOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& votes = context->input(0);  // [NP, O, C, 16]
    const Tensor& linear = context->input(1);  // [NP, O, 16]
    const Tensor& quadratic = context->input(2);  // [NP, O, 16]
    const Tensor& constant = context->input(3);  // [NP, O]
    int64_t np, types, children;
    if (!CheckVotes(context, votes, &np, &types, &children)) return;
    const TensorShape parent_shape({np, types, kPoseEntries});
    OP_REQUIRES(context, linear.shape() == parent_shape && quadratic.shape() == parent_shape,
                InvalidArgument("linear and quadratic must be ", parent_shape.DebugString(), ", got ",
                                linear.shape().DebugString(), " and ", quadratic.shape().DebugString()));
    OP_REQUIRES(context, constant.shape() == TensorShape({np, types}),
                InvalidArgument("constant must be [", np, ", ", types, "], got ", constant.shape().DebugString()));
    Tensor* forms;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({np, types, children}), &forms));
    const T* v = votes.flat<T>().data();
    const T* a = linear.flat<T>().data();
    const T* q = quadratic.flat<T>().data();
    const T* c = constant.flat<T>().data();
    T* out = forms->flat<T>().data();
    ForEachBlock(context, np * types, children * kPoseEntries, [&](int64_t first, int64_t end) {
      for (int64_t block = first; block < end; ++block) {
        Forms(v + block * children * kPoseEntries, a + block * kPoseEntries, q + block * kPoseEntries, c[block],
              children, out + block * children);
      }
    });
  }

 private:
  static void Forms(const T* __restrict v, const T* __restrict a, const T* __restrict q, T constant,
                    int64_t children, T* __restrict out) {
    for (int64_t i = 0; i < children; ++i) {
      const T* __restrict vote = v + i * kPoseEntries;
      T total = 0;
#pragma omp simd reduction(+ : total)
      for (int h = 0; h < kPoseEntries; ++h) total += vote[h] * (a[h] + vote[h] * q[h]);
      out[i] = total + constant;
    }
  }
};

// ---- CapsVotesGradient: grad[b, i, h] = sum_k u_k[b, i] (L_k[b, h] + 2 V[b, i, h] S_k[b, h]) ----
// The k uses come as lists (u_k [NP, O or 1, C], L_k and S_k [NP, O, 16]): no stacked or broadcast copies.

template <typename T>
class VotesGradientOp : public OpKernel {
 public:
  explicit VotesGradientOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& votes = context->input(0);  // [NP, O, C, 16]
    tensorflow::OpInputList per_child, linear_rows, square_rows;
    OP_REQUIRES_OK(context, context->input_list("per_child", &per_child));
    OP_REQUIRES_OK(context, context->input_list("linear_rows", &linear_rows));
    OP_REQUIRES_OK(context, context->input_list("square_rows", &square_rows));
    int64_t np, types, children;
    if (!CheckVotes(context, votes, &np, &types, &children)) return;
    const int rank = per_child.size();
    std::vector<Use> uses(rank);
    const TensorShape parent_shape({np, types, kPoseEntries});
    for (int k = 0; k < rank; ++k) {
      const Tensor& u = per_child[k];
      OP_REQUIRES(context,
                  u.dims() == 3 && u.dim_size(0) == np && u.dim_size(2) == children &&
                      (u.dim_size(1) == types || u.dim_size(1) == 1),
                  InvalidArgument("per_child must be [NP, O or 1, C], got ", u.shape().DebugString()));
      OP_REQUIRES(context, linear_rows[k].shape() == parent_shape && square_rows[k].shape() == parent_shape,
                  InvalidArgument("linear_rows and square_rows must be ", parent_shape.DebugString()));
      uses[k] = {u.flat<T>().data(), u.dim_size(1) == 1, linear_rows[k].flat<T>().data(),
                 square_rows[k].flat<T>().data()};
    }
    // The votes' last use: their buffer takes the gradient when nothing else holds it (peak memory).
    Tensor* gradient;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, votes.shape(), &gradient));
    const T* v = votes.flat<T>().data();
    T* out = gradient->flat<T>().data();
    const int64_t block_entries = children * kPoseEntries;
    ForEachBlock(context, np * types, block_entries * rank, [&](int64_t first, int64_t end) {
      std::vector<const T*> u(rank), lin(rank), sq(rank);
      for (int64_t block = first; block < end; ++block) {
        for (int k = 0; k < rank; ++k) {
          u[k] = uses[k].per_child + (uses[k].shared ? block / types : block) * children;
          lin[k] = uses[k].linear + block * kPoseEntries;
          sq[k] = uses[k].square + block * kPoseEntries;
        }
        Gradient(v + block * block_entries, u.data(), lin.data(), sq.data(), children, rank,
                 out + block * block_entries);
      }
    });
  }

 private:
  struct Use {
    const T* per_child;  // u_k, [NP, O or 1, C]
    bool shared;         // u_k is [NP, 1, C]: one factor for all O parent types
    const T* linear;     // L_k, [NP, O, 16]
    const T* square;     // S_k, [NP, O, 16]
  };

  // v and out may be the same buffer: each entry is read before it is written.
  static void Gradient(const T* v, const T* const* u, const T* const* lin, const T* const* sq, int64_t children,
                       int rank, T* out) {
    for (int64_t i = 0; i < children; ++i) {
      T linear[kPoseEntries] = {}, square[kPoseEntries] = {};
      for (int k = 0; k < rank; ++k) {
        const T weight = u[k][i];
        const T* __restrict lin_k = lin[k];
        const T* __restrict sq_k = sq[k];
#pragma omp simd
        for (int h = 0; h < kPoseEntries; ++h) {
          linear[h] += weight * lin_k[h];
          square[h] += weight * sq_k[h];
        }
      }
      const T* vote = v + i * kPoseEntries;
      T* target = out + i * kPoseEntries;
#pragma omp simd
      for (int h = 0; h < kPoseEntries; ++h) target[h] = linear[h] + T(2) * vote[h] * square[h];
    }
  }
};

// ---- Registration ----

absl::Status ParentShape(InferenceContext* context, int outputs) {
  ShapeHandle votes;
  TF_RETURN_IF_ERROR(context->WithRank(context->input(0), 4, &votes));
  ShapeHandle parents = context->MakeShape({context->Dim(votes, 0), context->Dim(votes, 1), kPoseEntries});
  for (int i = 0; i < outputs; ++i) context->set_output(i, parents);
  return absl::OkStatus();
}

REGISTER_OP("CapsWeightedSums")
    .Attr("T: {float, double}")
    .Input("votes: T")    // [NP, O, C, 16]
    .Input("weights: T")  // [NP, O or 1, C]
    .Output("vote_sum: T")     // [NP, O, 16]
    .Output("squared_sum: T")  // [NP, O, 16]
    .Output("mass: T")         // [NP, O, 1]
    .SetShapeFn([](InferenceContext* context) {
      TF_RETURN_IF_ERROR(ParentShape(context, 2));
      ShapeHandle votes = context->input(0);
      context->set_output(2, context->MakeShape({context->Dim(votes, 0), context->Dim(votes, 1), 1}));
      return absl::OkStatus();
    });

REGISTER_OP("CapsQuadraticForms")
    .Attr("T: {float, double}")
    .Input("votes: T")      // [NP, O, C, 16]
    .Input("linear: T")     // [NP, O, 16]
    .Input("quadratic: T")  // [NP, O, 16]
    .Input("constant: T")   // [NP, O]
    .Output("forms: T")     // [NP, O, C]
    .SetShapeFn([](InferenceContext* context) {
      ShapeHandle votes;
      TF_RETURN_IF_ERROR(context->WithRank(context->input(0), 4, &votes));
      context->set_output(0, context->MakeShape({context->Dim(votes, 0), context->Dim(votes, 1),
                                                 context->Dim(votes, 2)}));
      return absl::OkStatus();
    });

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

#define REGISTER_KERNELS(T)                                                                                   \
  REGISTER_KERNEL_BUILDER(Name("CapsWeightedSums").Device(DEVICE_CPU).TypeConstraint<T>("T"),               \
                          WeightedSumsOp<T>);                                                                 \
  REGISTER_KERNEL_BUILDER(Name("CapsQuadraticForms").Device(DEVICE_CPU).TypeConstraint<T>("T"),             \
                          QuadraticFormsOp<T>);                                                               \
  REGISTER_KERNEL_BUILDER(Name("CapsVotesGradient").Device(DEVICE_CPU).TypeConstraint<T>("T"), VotesGradientOp<T>);

REGISTER_KERNELS(float)
REGISTER_KERNELS(double)

}  // namespace capsule_ops
