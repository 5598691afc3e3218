// Fused vote contractions of EM routing (em_routing.py, `_VoteContractions`), CPU, float and double.
//
// EM routing touches the votes V [NP, O, C, 16] (parent-major: NP parent positions, O parent types,
// C children, 16 pose entries) in three ways, each a memory-bound pass over V:
//   CapsWeightedSums     sum_i r_i V_i and sum_i r_i V_i^2 (the M-step), V^2 computed on the fly;
//   CapsQuadraticForms   sum_h V_ih a_h + V_ih^2 b_h per child (the E-step's Mahalanobis term);
//   CapsVotesGradient    dL/dV = sum_k u_ki (L_kh + 2 V_ih S_kh), the routing's rank-k votes gradient.
// Each reads V once (TensorFlow ops need V^2 as its own tensor and one kernel per product). The work is
// split over the NP * O (parent position, type) blocks with TensorFlow's CPU thread pool; within a block
// the 16 pose entries are the vector lanes (AVX2 / AVX-512 as the build's -march allows).

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace capsule_ops {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

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

// Checks that `tensor` is [NP, O, k, last] and returns k (or -1 after setting an error).
int64_t RowsOf(OpKernelContext* context, const Tensor& tensor, int64_t np, int64_t types, int64_t last,
               const char* name) {
  if (tensor.dims() != 4 || tensor.dim_size(0) != np || tensor.dim_size(1) != types || tensor.dim_size(3) != last) {
    context->CtxFailure(InvalidArgument(name, " must be [", np, ", ", types, ", k, ", last, "], got ",
                                        tensor.shape().DebugString()));
    return -1;
  }
  return tensor.dim_size(2);
}

// ---- CapsWeightedSums: vote_sum[b, h] = sum_i r[b, i] V[b, i, h], squared_sum[b, h] = sum_i r V^2 ----

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
    Tensor *vote_sum, *squared_sum;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({np, types, kPoseEntries}), &vote_sum));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({np, types, kPoseEntries}), &squared_sum));
    const T* v = votes.flat<T>().data();
    const T* r = weights.flat<T>().data();
    T* sums = vote_sum->flat<T>().data();
    T* squares = squared_sum->flat<T>().data();
    ForEachBlock(context, np * types, children * kPoseEntries, [&](int64_t first, int64_t end) {
      for (int64_t block = first; block < end; ++block) {
        const int64_t weight_block = weight_types == 1 ? block / types : block;
        Accumulate(v + block * children * kPoseEntries, r + weight_block * children, children,
                   sums + block * kPoseEntries, squares + block * kPoseEntries);
      }
    });
  }

 private:
  static void Accumulate(const T* __restrict v, const T* __restrict r, int64_t children, T* __restrict sum_out,
                         T* __restrict square_out) {
    T sum[kPoseEntries] = {}, square[kPoseEntries] = {};
    for (int64_t i = 0; i < children; ++i) {
      const T weight = r[i];
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
  }
};

// ---- CapsQuadraticForms: forms[b, i] = sum_h V[b, i, h] a[b, h] + V[b, i, h]^2 q[b, h] ----

template <typename T>
class QuadraticFormsOp : public OpKernel {
 public:
  explicit QuadraticFormsOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& votes = context->input(0);  // [NP, O, C, 16]
    const Tensor& linear = context->input(1);  // [NP, O, 16]
    const Tensor& quadratic = context->input(2);  // [NP, O, 16]
    int64_t np, types, children;
    if (!CheckVotes(context, votes, &np, &types, &children)) return;
    const TensorShape parent_shape({np, types, kPoseEntries});
    OP_REQUIRES(context, linear.shape() == parent_shape && quadratic.shape() == parent_shape,
                InvalidArgument("linear and quadratic must be ", parent_shape.DebugString(), ", got ",
                                linear.shape().DebugString(), " and ", quadratic.shape().DebugString()));
    Tensor* forms;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({np, types, children}), &forms));
    const T* v = votes.flat<T>().data();
    const T* a = linear.flat<T>().data();
    const T* q = quadratic.flat<T>().data();
    T* out = forms->flat<T>().data();
    ForEachBlock(context, np * types, children * kPoseEntries, [&](int64_t first, int64_t end) {
      for (int64_t block = first; block < end; ++block) {
        Forms(v + block * children * kPoseEntries, a + block * kPoseEntries, q + block * kPoseEntries, children,
              out + block * children);
      }
    });
  }

 private:
  static void Forms(const T* __restrict v, const T* __restrict a, const T* __restrict q, int64_t children,
                    T* __restrict out) {
    for (int64_t i = 0; i < children; ++i) {
      const T* __restrict vote = v + i * kPoseEntries;
      T total = 0;
#pragma omp simd reduction(+ : total)
      for (int h = 0; h < kPoseEntries; ++h) total += vote[h] * (a[h] + vote[h] * q[h]);
      out[i] = total;
    }
  }
};

// ---- CapsVotesGradient: grad[b, i, h] = sum_k u[b, k, i] (L[b, k, h] + 2 V[b, i, h] S[b, k, h]) ----

template <typename T>
class VotesGradientOp : public OpKernel {
 public:
  explicit VotesGradientOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& votes = context->input(0);  // [NP, O, C, 16]
    const Tensor& per_child = context->input(1);  // [NP, O, k, C]
    const Tensor& linear_rows = context->input(2);  // [NP, O, k, 16]
    const Tensor& square_rows = context->input(3);  // [NP, O, k, 16]
    int64_t np, types, children;
    if (!CheckVotes(context, votes, &np, &types, &children)) return;
    const int64_t rank = RowsOf(context, per_child, np, types, children, "per_child");
    if (rank < 0) return;
    OP_REQUIRES(context, RowsOf(context, linear_rows, np, types, kPoseEntries, "linear_rows") == rank,
                InvalidArgument("linear_rows must have ", rank, " rows"));
    OP_REQUIRES(context, RowsOf(context, square_rows, np, types, kPoseEntries, "square_rows") == rank,
                InvalidArgument("square_rows must have ", rank, " rows"));
    Tensor* gradient;
    OP_REQUIRES_OK(context, context->allocate_output(0, votes.shape(), &gradient));
    const T* v = votes.flat<T>().data();
    const T* u = per_child.flat<T>().data();
    const T* lin = linear_rows.flat<T>().data();
    const T* sq = square_rows.flat<T>().data();
    T* out = gradient->flat<T>().data();
    const int64_t block_entries = children * kPoseEntries;
    ForEachBlock(context, np * types, block_entries * rank, [&](int64_t first, int64_t end) {
      for (int64_t block = first; block < end; ++block) {
        Gradient(v + block * block_entries, u + block * rank * children, lin + block * rank * kPoseEntries,
                 sq + block * rank * kPoseEntries, children, rank, out + block * block_entries);
      }
    });
  }

 private:
  static void Gradient(const T* __restrict v, const T* __restrict u, const T* __restrict lin, const T* __restrict sq,
                       int64_t children, int64_t rank, T* __restrict out) {
    for (int64_t i = 0; i < children; ++i) {
      T linear[kPoseEntries] = {}, square[kPoseEntries] = {};
      for (int64_t k = 0; k < rank; ++k) {
        const T weight = u[k * children + i];
#pragma omp simd
        for (int h = 0; h < kPoseEntries; ++h) {
          linear[h] += weight * lin[k * kPoseEntries + h];
          square[h] += weight * sq[k * kPoseEntries + h];
        }
      }
      const T* __restrict vote = v + i * kPoseEntries;
      T* __restrict target = out + i * kPoseEntries;
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
    .SetShapeFn([](InferenceContext* context) { return ParentShape(context, 2); });

REGISTER_OP("CapsQuadraticForms")
    .Attr("T: {float, double}")
    .Input("votes: T")      // [NP, O, C, 16]
    .Input("linear: T")     // [NP, O, 16]
    .Input("quadratic: T")  // [NP, O, 16]
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
    .Input("votes: T")        // [NP, O, C, 16]
    .Input("per_child: T")    // [NP, O, k, C]
    .Input("linear_rows: T")  // [NP, O, k, 16]
    .Input("square_rows: T")  // [NP, O, k, 16]
    .Output("gradient: T")    // [NP, O, C, 16]
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
