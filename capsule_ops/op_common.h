// What every kernel source of capsule_ops includes: TensorFlow's op and kernel headers, the thread-pool
// sharder, and the names the kernels use from them.

#ifndef CAPSULE_OPS_OP_COMMON_H_
#define CAPSULE_OPS_OP_COMMON_H_

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

}  // namespace capsule_ops

#endif  // CAPSULE_OPS_OP_COMMON_H_
