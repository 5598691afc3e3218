// The conv E-step's normaliser over the parents that see each child, and its gradient, CPU, float and double.
//
// In a convolutional capsule layer a child (position, type i) is seen by every parent position whose
// receptive field holds it. The E-step normalises each child over those parents (PatchLayout.normalise in
// receptive_field.py): in the patch layout [NP, O, KK*I] (NP = N * P parent positions ordered (n, oh, ow),
// O parent types, KK kernel offsets ordered (kh, kw), I child types) every entry needs the max and the sum
// over the entries that hold the same child. With TensorFlow ops each is a transpose, a fold onto the child
// grid (unsorted_segment_max/sum), a slice, a patch extraction and a transpose back, in the forward and again
// in the backward pass; here each image is folded into a child-grid scratch buffer and read back at every
// patch entry:
//   CapsNormaliseOverParents(log_numerators, child_ids; per_type, num_children, input_types)
//     x [NP, O, KKI] -> R [NP, O, KKI]: exp(x - shift) / (the child's sum of it over its parents), the shift
//     the child's largest x over them (so every sum is >= 1); three passes;
//   CapsNormaliseOverParentsGrad(R, dL/dR, child_ids; the same attributes)
//     -> dL/dx = R (dL/dR - the child's sum of R dL/dR over its parents); two passes.
// per_type = true: over the positions of each parent type separately (types do not compete); false: over
// positions and types. child_ids [P * KK] (ReceptiveField.child_ids) is the child position each (parent
// position, offset) sees, num_children (H * W) at an offset in 'SAME' padding, where R and dL/dx are 0.

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "op_common.h"

namespace capsule_ops {

constexpr int kGradientCostPerEntry = 6;  // sharder cost estimates per patch entry: two passes of reads and writes
constexpr int kNormaliseCostPerEntry = 30;  // three passes and an exp

// The patch layout of one call: NP = images * positions, KKI = offsets * input_types.
struct PatchGeometry {
  int64_t images = 0, positions = 0, types = 0, offsets = 0, input_types = 0, out_types = 0;
  const int32_t* child_ids = nullptr;  // [P * KK]
  int64_t Patch() const { return offsets * input_types; }  // KKI
  int64_t ImageEntries() const { return positions * types * Patch(); }  // P * O * KKI
};

// What both ops share: the attributes, the checks of values [NP, O, KKI] and child_ids [P * KK], a per-image
// child grid [H*W, O or 1, I] on the CPU pool, and a walk over an image's patch entries.
template <typename T>
class PatchFoldOp : public OpKernel {
 public:
  explicit PatchFoldOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("per_type", &per_type_));
    OP_REQUIRES_OK(context, context->GetAttr("num_children", &num_children_));
    OP_REQUIRES_OK(context, context->GetAttr("input_types", &input_types_));
  }

  // Checks the inputs, allocates the output [NP, O, KKI] zero-filled, and runs the op's Fold on it.
  void Compute(OpKernelContext* context) final {
    PatchGeometry g;
    Tensor* output;
    if (Prepare(context, &g, &output)) Fold(context, g, output->flat<T>().data());
  }

 protected:
  // Writes the op's output `out` [NP, O, KKI] (zero-filled) from its inputs, which Prepare checked.
  virtual void Fold(OpKernelContext* context, const PatchGeometry& g, T* out) = 0;

  // Checks the inputs (values [NP, O, KKI] first, child_ids last, any other input values' shape); fills `g`
  // and allocates the output, values' shape, zero-filled (offsets in padding stay 0). False on a bad input.
  bool Prepare(OpKernelContext* context, PatchGeometry* g, Tensor** output) {
    const Tensor& values = context->input(0);  // [NP, O, KKI]
    const Tensor& child_ids = context->input(context->num_inputs() - 1);  // [P * KK]
    auto fail = [context](const absl::Status& status) {
      context->CtxFailure(status);
      return false;
    };
    if (values.dims() != 3 || values.dim_size(2) % input_types_ != 0) {
      return fail(InvalidArgument("values must be [NP, O, KK * ", input_types_, "], got ",
                                  values.shape().DebugString()));
    }
    g->input_types = input_types_;
    g->offsets = values.dim_size(2) / input_types_;
    g->types = values.dim_size(1);
    g->out_types = per_type_ ? g->types : 1;
    if (child_ids.dims() != 1 || g->offsets == 0 || child_ids.dim_size(0) % g->offsets != 0) {
      return fail(InvalidArgument("child_ids must be [P * ", g->offsets, "], got ", child_ids.shape().DebugString()));
    }
    g->positions = child_ids.dim_size(0) / g->offsets;
    if (g->positions == 0 || values.dim_size(0) % g->positions != 0) {
      return fail(InvalidArgument("values' first dimension ", values.dim_size(0), " is not images x ", g->positions,
                                  " positions"));
    }
    g->images = values.dim_size(0) / g->positions;
    for (int input = 1; input < context->num_inputs() - 1; ++input) {
      if (context->input(input).shape() != values.shape()) {
        return fail(InvalidArgument("every patch input must be ", values.shape().DebugString(), ", got ",
                                    context->input(input).shape().DebugString()));
      }
    }
    g->child_ids = child_ids.flat<int32_t>().data();
    for (int64_t j = 0; j < child_ids.dim_size(0); ++j) {
      if (g->child_ids[j] < 0 || g->child_ids[j] > num_children_) {
        return fail(InvalidArgument("child_ids must be in [0, ", num_children_, "], got ", g->child_ids[j]));
      }
    }
    const absl::Status allocated = context->allocate_output(0, values.shape(), output);
    if (!allocated.ok()) return fail(allocated);
    std::fill_n((*output)->flat<T>().data(), (*output)->NumElements(), T(0));
    return true;
  }

  // Runs fn(n, grids) for every image n on the CPU pool, each shard with its own `count` grids, each
  // [H*W, O or 1, I] and GridSize(g) long, one after the other.
  int64_t GridSize(const PatchGeometry& g) const { return num_children_ * g.out_types * g.input_types; }
  template <typename Fn>
  void ForEachImage(OpKernelContext* context, const PatchGeometry& g, int64_t cost_per_entry, int count,
                    Fn fn) const {
    const int64_t image_entries = g.ImageEntries();
    const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
    tensorflow::Shard(workers.num_threads, workers.workers, g.images, image_entries * cost_per_entry,
                      [&](int64_t first, int64_t end) {
                        std::vector<T> grids(count * GridSize(g));
                        for (int64_t n = first; n < end; ++n) fn(n, grids.data());
                      });
  }

  // Calls fn(entry, cell) for every patch entry of image n at an offset that holds a child: entry is the
  // offset of its I values in the image's [P, types, KKI] block, cell the offset of their child's I values
  // in the grid. `types`: O (every parent type's entries) or 1 (one row per position, e.g. an output of
  // per_type = false).
  template <typename Fn>
  void ForEachEntry(const PatchGeometry& g, int64_t types, Fn fn) const {
    for (int64_t p = 0; p < g.positions; ++p) {
      for (int64_t k = 0; k < g.offsets; ++k) {
        const int32_t child = g.child_ids[p * g.offsets + k];
        if (child == num_children_) continue;  // an offset in padding holds no child
        for (int64_t o = 0; o < types; ++o) {
          const int64_t cell_type = per_type_ ? o : 0;
          fn((p * types + o) * g.Patch() + k * g.input_types, (child * g.out_types + cell_type) * g.input_types);
        }
      }
    }
  }

  bool per_type_ = false;
  int num_children_ = 0, input_types_ = 0;
};

// ---- CapsNormaliseOverParents: R = exp(x) / (each child's sum of exp(x) over its parents), 0 in padding ----

template <typename T>
class NormaliseOverParentsOp : public PatchFoldOp<T> {
 public:
  explicit NormaliseOverParentsOp(OpKernelConstruction* context) : PatchFoldOp<T>(context) {}

  void Fold(OpKernelContext* context, const PatchGeometry& g, T* out) override {
    const T* in = context->input(0).flat<T>().data();
    const int64_t image_entries = g.ImageEntries(), grid_size = this->GridSize(g);
    const int64_t I = g.input_types;
    this->ForEachImage(context, g, kNormaliseCostPerEntry, 2, [&](int64_t n, T* grids) {
      T *shift = grids, *grid = grids + grid_size;  // each child's largest numerator, its sum of exp(x - shift)
      std::fill(shift, shift + grid_size, std::numeric_limits<T>::lowest());
      std::fill(grid, grid + grid_size, T(0));
      const T* image = in + n * image_entries;
      T* result = out + n * image_entries;
      this->ForEachEntry(g, g.types, [&](int64_t entry, int64_t cell) {
        for (int64_t i = 0; i < I; ++i) shift[cell + i] = std::max(shift[cell + i], image[entry + i]);
      });
      this->ForEachEntry(g, g.types, [&](int64_t entry, int64_t cell) {  // the shift makes every sum >= 1
        for (int64_t i = 0; i < I; ++i) {
          result[entry + i] = std::exp(image[entry + i] - shift[cell + i]);
          grid[cell + i] += result[entry + i];
        }
      });
      this->ForEachEntry(g, g.types, [&](int64_t entry, int64_t cell) {
        for (int64_t i = 0; i < I; ++i) result[entry + i] /= grid[cell + i];
      });
    });
  }
};

// ---- CapsNormaliseOverParentsGrad: dL/dx = R (g - the sum of R g over the entries of the child) ----
// The normaliser is a softmax over each child's parents: dR_j/dx_j' = R_j (delta_jj' - R_j') within a child.

template <typename T>
class NormaliseOverParentsGradOp : public PatchFoldOp<T> {
 public:
  explicit NormaliseOverParentsGradOp(OpKernelConstruction* context) : PatchFoldOp<T>(context) {}

  void Fold(OpKernelContext* context, const PatchGeometry& g, T* out) override {
    const T* r = context->input(0).flat<T>().data();
    const T* grad = context->input(1).flat<T>().data();
    const int64_t image_entries = g.ImageEntries();
    const int64_t I = g.input_types;
    this->ForEachImage(context, g, kGradientCostPerEntry, 1, [&](int64_t n, T* grid) {
      std::fill(grid, grid + this->GridSize(g), T(0));
      const T* image_r = r + n * image_entries;
      const T* image_grad = grad + n * image_entries;
      this->ForEachEntry(g, g.types, [&](int64_t entry, int64_t cell) {
#pragma omp simd
        for (int64_t i = 0; i < I; ++i) grid[cell + i] += image_r[entry + i] * image_grad[entry + i];
      });
      T* result = out + n * image_entries;
      this->ForEachEntry(g, g.types, [&](int64_t entry, int64_t cell) {
#pragma omp simd
        for (int64_t i = 0; i < I; ++i) {
          result[entry + i] = image_r[entry + i] * (image_grad[entry + i] - grid[cell + i]);
        }
      });
    });
  }
};

REGISTER_OP("CapsNormaliseOverParents")
    .Attr("T: {float, double}")
    .Attr("per_type: bool")
    .Attr("num_children: int >= 1")  // H * W child positions of an image
    .Attr("input_types: int >= 1")   // I
    .Input("log_numerators: T")      // [NP, O, KK * I]
    .Input("child_ids: int32")       // [P * KK], num_children at offsets in padding
    .Output("assignments: T")        // [NP, O, KK * I]
    .SetShapeFn([](InferenceContext* context) {
      context->set_output(0, context->input(0));
      return absl::OkStatus();
    });

REGISTER_OP("CapsNormaliseOverParentsGrad")
    .Attr("T: {float, double}")
    .Attr("per_type: bool")
    .Attr("num_children: int >= 1")
    .Attr("input_types: int >= 1")
    .Input("assignments: T")       // R [NP, O, KK * I]
    .Input("assignments_grad: T")  // dL/dR [NP, O, KK * I]
    .Input("child_ids: int32")     // [P * KK]
    .Output("gradient: T")         // dL/d log_numerators [NP, O, KK * I]
    .SetShapeFn([](InferenceContext* context) {
      context->set_output(0, context->input(0));
      return absl::OkStatus();
    });

#define REGISTER_FOLD_KERNELS(T)                                                                      \
  REGISTER_KERNEL_BUILDER(Name("CapsNormaliseOverParents").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          NormaliseOverParentsOp<T>);                                                 \
  REGISTER_KERNEL_BUILDER(Name("CapsNormaliseOverParentsGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          NormaliseOverParentsGradOp<T>);

REGISTER_FOLD_KERNELS(float)
REGISTER_FOLD_KERNELS(double)

}  // namespace capsule_ops
