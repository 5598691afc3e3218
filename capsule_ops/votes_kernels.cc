// Votes of a capsule layer straight into the parent-major layout, and their gradient; CPU, float and double.
//
//   CapsVotes          votes[n, o, i] = poses[n, i] @ weights[o, i]   (4x4 @ 4x4 per child-parent pair)
//   CapsVotesBackward  poses_grad[n, i] = sum_o g[n, o, i] @ weights[o, i]^T,
//                      weights_grad[o, i] = sum_n poses[n, i]^T @ g[n, o, i]
//   CapsRoutingVotesBackward  the same, with g = EM routing's rank-k votes gradient (kernels.cc's
//                      CapsVotesGradient) made on the fly, V = M W recomputed beside it: neither the votes nor
//                      a vote-sized gradient is stored
// poses [NP, C, 16] (each child's pose at each parent position: the layer's patches), weights [O, C, 16],
// votes and g [NP, O, C, 16]. TensorFlow ops need a transpose before and after a batched matmul for this
// (and the same in the gradient); here the votes are written once in their final layout and the gradient
// reads g once. A 4x4 product is four multiply-adds of 16-lane vectors whose operands are lane permutations
// of the two matrices (pose_math.h).

#include <algorithm>
#include <vector>

#include "op_common.h"
#include "pose_math.h"

namespace capsule_ops {
namespace {

constexpr int kCostPerVote = 64;  // multiply-adds of a 4x4 product, for the sharder
constexpr int kChunksPerThread = 4;
constexpr int kTileChildren = 16;  // children whose pose permutations are reused across the O parent types  // weight-gradient partial sums per thread: load balance vs. memory

bool CheckPosesAndWeights(OpKernelContext* context, const Tensor& poses, const Tensor& weights) {
  if (poses.dims() != 3 || poses.dim_size(2) != kEntries || weights.dims() != 3 ||
      weights.dim_size(2) != kEntries || weights.dim_size(1) != poses.dim_size(1)) {
    context->CtxFailure(InvalidArgument("poses must be [NP, C, 16] and weights [O, C, 16], got ",
                                        poses.shape().DebugString(), " and ", weights.shape().DebugString()));
    return false;
  }
  return true;
}

template <typename Fn>
void Parallel(OpKernelContext* context, int64_t units, int64_t cost_per_unit, Fn fn) {
  const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(workers.num_threads, workers.workers, units, cost_per_unit, fn);
}

template <typename T>
class VotesOp : public OpKernel {
 public:
  explicit VotesOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& poses = context->input(0);    // [NP, C, 16]
    const Tensor& weights = context->input(1);  // [O, C, 16]
    if (!CheckPosesAndWeights(context, poses, weights)) return;
    const int64_t np = poses.dim_size(0), children = poses.dim_size(1), types = weights.dim_size(0);
    Tensor* votes;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({np, types, children, kEntries}), &votes));
    const T* m = poses.flat<T>().data();
    const T* w = weights.flat<T>().data();
    T* out = votes->flat<T>().data();
    Parallel(context, np * types, children * kCostPerVote, [&](int64_t first, int64_t end) {
      for (int64_t block = first; block < end; ++block) {  // block = (parent position, type)
        const T* pose = m + (block / types) * children * kEntries;
        const T* weight = w + (block % types) * children * kEntries;
        T* vote = out + block * children * kEntries;
        for (int64_t i = 0; i < children; ++i) {
          Store(vote + i * kEntries, Product<T>(Load(pose + i * kEntries), Load(weight + i * kEntries)));
        }
      }
    });
  }
};

// dL/dM and dL/dW from dL/dV, which `Source` gives per (parent position n, type o, child i) as a 16-lane
// vector: source.Prepare(n) once per position, then source(o, i). The weight gradient is summed over positions
// in per-chunk partial sums (a few per thread), then added up.
template <typename T, typename Source>
void PoseAndWeightGradients(OpKernelContext* context, const Tensor& poses, const Tensor& weights,
                            const Source& source) {
  const int64_t np = poses.dim_size(0), children = poses.dim_size(1), types = weights.dim_size(0);
  Tensor *poses_grad, *weights_grad, partial;
  OP_REQUIRES_OK(context, context->allocate_output(0, poses.shape(), &poses_grad));
  OP_REQUIRES_OK(context, context->allocate_output(1, weights.shape(), &weights_grad));
  const int64_t weight_entries = types * children * kEntries;
  const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(np, kChunksPerThread * workers.num_threads));
  OP_REQUIRES_OK(context, context->allocate_temp(tensorflow::DataTypeToEnum<T>::value,
                                                 TensorShape({chunks, weight_entries}), &partial));
  const T* m = poses.flat<T>().data();
  const T* w = weights.flat<T>().data();
  T* partials = partial.flat<T>().data();
  T* dm = poses_grad->flat<T>().data();
  Parallel(context, chunks, (np / chunks + 1) * types * children * 2 * kCostPerVote, [&](int64_t first, int64_t end) {
    Source local = source;  // per-shard scratch
    for (int64_t chunk = first; chunk < end; ++chunk) {
      T* dw = partials + chunk * weight_entries;
      std::fill(dw, dw + weight_entries, T(0));
      for (int64_t n = chunk * np / chunks; n < (chunk + 1) * np / chunks; ++n) {
        local.Prepare(n);
        T* dm_n = dm + n * children * kEntries;
        // A tile of children at a time: their poses' permutations, made once, meet the O weight matrices (the
        // tile's u_k, L_k, S_k, dL/dM and dL/dW stay in L1).
        for (int64_t tile = 0; tile < children; tile += kTileChildren) {
          const int64_t count = std::min<int64_t>(kTileChildren, children - tile);
          LeftPose<T> pose[kTileChildren];
          Vec<T> pose_grad[kTileChildren] = {};
          for (int64_t j = 0; j < count; ++j) pose[j] = LeftPose<T>(Load(m + (n * children + tile + j) * kEntries));
          for (int64_t o = 0; o < types; ++o) {
            for (int64_t j = 0; j < count; ++j) {
              const int64_t i = tile + j, entry = (o * children + i) * kEntries;
              const Vec<T> wv = Load(w + entry);
              const Vec<T> gv = Source::kUsesVote ? local(o, i, Product<T>(pose[j], wv)) : local(o, i, wv);
              pose_grad[j] += TransposedRightTerm<T, 0>(gv, wv) + TransposedRightTerm<T, 1>(gv, wv) +
                              TransposedRightTerm<T, 2>(gv, wv) + TransposedRightTerm<T, 3>(gv, wv);
              Store(dw + entry, Load(dw + entry) + TransposedLeftProduct<T>(pose[j], gv));
            }
          }
          for (int64_t j = 0; j < count; ++j) Store(dm_n + (tile + j) * kEntries, pose_grad[j]);
        }
      }
    }
  });
  T* dw_out = weights_grad->flat<T>().data();
  Parallel(context, weight_entries, chunks, [&](int64_t first, int64_t end) {
    for (int64_t e = first; e < end; ++e) {
      T total = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partials[chunk * weight_entries + e];
      dw_out[e] = total;
    }
  });
}

// dL/dV given as a tensor [NP, O, C, 16].
template <typename T>
struct StoredGradient {
  const T* g;
  int64_t types, children;
  const T* position = nullptr;
  void Prepare(int64_t n) { position = g + n * types * children * kEntries; }
  static constexpr bool kUsesVote = false;
  Vec<T> operator()(int64_t o, int64_t i, const Vec<T>&) { return Load(position + (o * children + i) * kEntries); }
};

// dL/dV of EM routing made on the fly: sum_k u_k[n, o, i] (L_k[n, o] + 2 V[n, o, i] S_k[n, o]) (kernels.cc's
// CapsVotesGradient), V = M W recomputed from the pose and weight at hand: nothing vote-sized is read or stored.
template <typename T>
struct RoutingGradient {
  int64_t types, children;
  std::vector<const T*> per_child, linear, square;  // u_k [NP, O or 1, C]; L_k, S_k [NP, O, 16]
  std::vector<bool> shared;                          // u_k is [NP, 1, C]
  // The current (position, type)'s factors, gathered by SetType: u_k's row, L_k and S_k.
  std::vector<const T*> rows;
  std::vector<Vec<T>> lin, sq;
  int64_t n = 0, type = -1;

  void Prepare(int64_t position) {
    n = position, type = -1;
    rows.resize(per_child.size()), lin.resize(per_child.size()), sq.resize(per_child.size());
  }
  void SetType(int64_t o) {
    const int64_t block = n * types + o;
    for (size_t k = 0; k < per_child.size(); ++k) {
      rows[k] = per_child[k] + (shared[k] ? n : block) * children;
      lin[k] = Load(linear[k] + block * kEntries), sq[k] = Load(square[k] + block * kEntries);
    }
    type = o;
  }
  static constexpr bool kUsesVote = true;
  Vec<T> operator()(int64_t o, int64_t i, const Vec<T>& vote) {
    if (o != type) SetType(o);
    Vec<T> linear_sum = {}, square_sum = {};
    const size_t rank = rows.size();
    for (size_t k = 0; k < rank; ++k) {
      const T u = rows[k][i];
      linear_sum += u * lin[k];
      square_sum += u * sq[k];
    }
    return linear_sum + T(2) * vote * square_sum;
  }
};

template <typename T>
class VotesBackwardOp : public OpKernel {
 public:
  explicit VotesBackwardOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& poses = context->input(0);    // [NP, C, 16]
    const Tensor& weights = context->input(1);  // [O, C, 16]
    const Tensor& grad = context->input(2);     // [NP, O, C, 16]
    if (!CheckPosesAndWeights(context, poses, weights)) return;
    const int64_t np = poses.dim_size(0), children = poses.dim_size(1), types = weights.dim_size(0);
    OP_REQUIRES(context, grad.shape() == TensorShape({np, types, children, kEntries}),
                InvalidArgument("votes gradient must be [NP, O, C, 16], got ", grad.shape().DebugString()));
    PoseAndWeightGradients<T>(context, poses, weights, StoredGradient<T>{grad.flat<T>().data(), types, children});
  }
};

template <typename T>
class RoutingVotesBackwardOp : public OpKernel {
 public:
  explicit RoutingVotesBackwardOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& poses = context->input(0);    // [NP, C, 16]
    const Tensor& weights = context->input(1);  // [O, C, 16]
    tensorflow::OpInputList per_child, linear_rows, square_rows;
    OP_REQUIRES_OK(context, context->input_list("per_child", &per_child));
    OP_REQUIRES_OK(context, context->input_list("linear_rows", &linear_rows));
    OP_REQUIRES_OK(context, context->input_list("square_rows", &square_rows));
    if (!CheckPosesAndWeights(context, poses, weights)) return;
    const int64_t np = poses.dim_size(0), children = poses.dim_size(1), types = weights.dim_size(0);
    RoutingGradient<T> source{types, children};
    const TensorShape parent_shape({np, types, kEntries});
    for (int k = 0; k < per_child.size(); ++k) {
      const Tensor& u = per_child[k];
      OP_REQUIRES(context,
                  u.dims() == 3 && u.dim_size(0) == np && u.dim_size(2) == children &&
                      (u.dim_size(1) == types || u.dim_size(1) == 1),
                  InvalidArgument("per_child must be [NP, O or 1, C], got ", u.shape().DebugString()));
      OP_REQUIRES(context, linear_rows[k].shape() == parent_shape && square_rows[k].shape() == parent_shape,
                  InvalidArgument("linear_rows and square_rows must be ", parent_shape.DebugString()));
      source.per_child.push_back(u.flat<T>().data());
      source.shared.push_back(u.dim_size(1) == 1);
      source.linear.push_back(linear_rows[k].flat<T>().data());
      source.square.push_back(square_rows[k].flat<T>().data());
    }
    PoseAndWeightGradients<T>(context, poses, weights, source);
  }
};

REGISTER_OP("CapsVotes")
    .Attr("T: {float, double}")
    .Input("poses: T")    // [NP, C, 16]
    .Input("weights: T")  // [O, C, 16]
    .Output("votes: T")   // [NP, O, C, 16]
    .SetShapeFn([](InferenceContext* context) {
      ShapeHandle poses, weights;
      TF_RETURN_IF_ERROR(context->WithRank(context->input(0), 3, &poses));
      TF_RETURN_IF_ERROR(context->WithRank(context->input(1), 3, &weights));
      context->set_output(0, context->MakeShape({context->Dim(poses, 0), context->Dim(weights, 0),
                                                 context->Dim(poses, 1), kEntries}));
      return absl::OkStatus();
    });

REGISTER_OP("CapsVotesBackward")
    .Attr("T: {float, double}")
    .Input("poses: T")         // [NP, C, 16]
    .Input("weights: T")       // [O, C, 16]
    .Input("votes_grad: T")    // [NP, O, C, 16]
    .Output("poses_grad: T")   // [NP, C, 16]
    .Output("weights_grad: T") // [O, C, 16]
    .SetShapeFn([](InferenceContext* context) {
      context->set_output(0, context->input(0));
      context->set_output(1, context->input(1));
      return absl::OkStatus();
    });

REGISTER_OP("CapsRoutingVotesBackward")
    .Attr("T: {float, double}")
    .Attr("K: int >= 1")
    .Input("poses: T")            // [NP, C, 16]
    .Input("weights: T")          // [O, C, 16]
    .Input("per_child: K * T")    // K x [NP, O or 1, C]
    .Input("linear_rows: K * T")  // K x [NP, O, 16]
    .Input("square_rows: K * T")  // K x [NP, O, 16]
    .Output("poses_grad: T")      // [NP, C, 16]
    .Output("weights_grad: T")    // [O, C, 16]
    .SetShapeFn([](InferenceContext* context) {
      context->set_output(0, context->input(0));
      context->set_output(1, context->input(1));
      return absl::OkStatus();
    });

#define REGISTER_VOTE_KERNELS(T)                                                                             \
  REGISTER_KERNEL_BUILDER(Name("CapsVotes").Device(DEVICE_CPU).TypeConstraint<T>("T"), VotesOp<T>);          \
  REGISTER_KERNEL_BUILDER(Name("CapsVotesBackward").Device(DEVICE_CPU).TypeConstraint<T>("T"), VotesBackwardOp<T>); \
  REGISTER_KERNEL_BUILDER(Name("CapsRoutingVotesBackward").Device(DEVICE_CPU).TypeConstraint<T>("T"),          \
                          RoutingVotesBackwardOp<T>);

REGISTER_VOTE_KERNELS(float)
REGISTER_VOTE_KERNELS(double)

}  // namespace
}  // namespace capsule_ops
