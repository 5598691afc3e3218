"""Receptive-field geometry of convolutional capsule layers, and the fold (paper section 3).

In a convolutional capsule layer a child is seen by every parent whose receptive field contains it (up
to ceil(K/s)^2 positions times O types). The E-step normalises each child over the parents that see it:
the per-patch values are summed back onto child positions (the "fold", the transpose of patch extraction).
1-D example: the size-2, stride-1 patches of [1, 2, 3, 4] are [[1, 2], [2, 3], [3, 4]]; folded back they
give [1, 4, 6, 4]. `PatchLayout` holds a layer's patch values in routing's parent-major layout and the E-step's
sums and maxima over a child's parents (TensorFlow ops, or one fused kernel of capsule_ops). Axis names as in
capsule_layers.py. Imports only numpy, tensorflow, capsule_ops and em_routing.
"""

import numpy as np
import tensorflow.compat.v1 as tf

import capsule_ops
from routing.em_routing import _safe_log

VALID_PADDINGS = ("VALID", "SAME")


def _pair(value):
    """An int or a pair of ints as a pair (height, width)."""
    return (value, value) if isinstance(value, int) else tuple(value)


def conv_geometry(height, width, kernel_size, stride, padding):
    """Output size and leading padding of a convolution, with the rules of `tf.nn.conv2d`.

    Args:
      height, width: input grid size.
      kernel_size, stride: ints or (height, width) pairs.
      padding: 'VALID' or 'SAME'.

    Returns:
      (out_height, out_width, pad_top, pad_left).
    """
    if padding not in VALID_PADDINGS:
        raise ValueError("padding must be one of %s, got %r" % (VALID_PADDINGS, padding))
    (kh, kw), (sh, sw) = _pair(kernel_size), _pair(stride)
    out, pad = [], []
    for size, k, s in ((height, kh, sh), (width, kw, sw)):
        if padding == "VALID":
            n = (size - k) // s + 1
            out.append(n)
            pad.append(0)
        else:
            n = -(-size // s)  # ceil(size / s)
            out.append(n)
            pad.append(max((n - 1) * s + k - size, 0) // 2)
    if out[0] < 1 or out[1] < 1:
        raise ValueError("a %dx%d kernel with %s padding does not fit a %dx%d input" % (kh, kw, padding, height, width))
    return out[0], out[1], pad[0], pad[1]


def receptive_field_centres(size, convolutions):
    """Where each output cell of a chain of convolutions looks, as the released code tracks it.

    The released code starts from pixel coordinates measured from the image centre (-size//2 .. (size-1)//2
    along each axis) and convolves them with an averaging kernel (sum over the K x K window / K^2, zeros in
    'SAME' padding) at each layer, so a cell holds the mean pixel coordinate of its receptive field.

    Args:
      size: the (square) image's height and width in pixels.
      convolutions: (kernel_size, stride, padding) of each layer from the image up, in order.

    Returns:
      float64 array `[H, W, 2]`: (row, column) of each output cell of the last layer.
    """
    pixels = np.arange(size, dtype=np.float64) - size // 2  # [size], offsets from the centre
    grid = np.stack(np.meshgrid(pixels, pixels, indexing="ij"), axis=-1)  # [size, size, 2]
    for kernel_size, stride, padding in convolutions:
        cells = grid.shape[0]
        out, _, pad, _ = conv_geometry(cells, cells, kernel_size, stride, padding)
        taps = np.arange(out)[:, None] * stride + np.arange(kernel_size)[None, :] - pad  # [out, K]
        inside = (taps >= 0) & (taps < cells)  # [out, K]
        taps = np.clip(taps, 0, cells - 1)
        window = grid[taps[:, None, :, None], taps[None, :, None, :]]  # [out, out, K, K, 2]
        mask = inside[:, None, :, None] & inside[None, :, None, :]  # [out, out, K, K]
        grid = np.where(mask[..., None], window, 0.0).sum(axis=(2, 3)) / kernel_size**2  # [out, out, 2]
    return grid


class ReceptiveField:
    """Which child position each (parent position, kernel offset) sees, and the fold over it.

    Built once from static sizes with numpy; the graph then uses dense ops only:
    `tf.image.extract_patches` (child -> patch layout) and `unsorted_segment_{sum,max}` with
    precomputed child ids (patch -> child layout, the "fold"). Offsets that fall in 'SAME' padding
    map to one extra dump segment that is dropped.

    Fold timings, paper conv_caps1 at batch 32 ([32, 5, 5, 3, 3, 32] -> [32, 12, 12, 32]), medians of
    30 runs on the 2-core AVX2 dev machine, result fetched: unsorted_segment_sum 0.79 ms
    (unsorted_segment_max 1.08 ms), gradient of extract_patches 0.88 ms, conv2d_transpose with a
    one-hot kernel 1.92 ms (shared TF-NOTES: 6-D SparseTensor 35-55 ms). All agree exactly. Segment
    ops win, and the same ids give the fold-max that the stable log-space E-step needs.
    """

    def __init__(self, height, width, kernel_size, stride, padding):
        self.height, self.width = height, width
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), padding
        self.out_height, self.out_width, pad_top, pad_left = conv_geometry(height, width, kernel_size, stride, padding)
        kh, kw = self.kernel_size
        sh, sw = self.stride
        rows = np.arange(self.out_height)[:, None] * sh + np.arange(kh)[None, :] - pad_top  # [OH, kh]
        cols = np.arange(self.out_width)[:, None] * sw + np.arange(kw)[None, :] - pad_left  # [OW, kw]
        rows = rows[:, None, :, None]  # [OH, 1, kh, 1]
        cols = cols[None, :, None, :]  # [1, OW, 1, kw]
        valid = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)  # [OH, OW, kh, kw]
        self.num_children = height * width
        child = np.where(valid, rows * width + cols, self.num_children)  # [OH, OW, kh, kw]
        self.child_ids = child.reshape(-1).astype(np.int32)  # [OH*OW*kh*kw], dump id = H*W
        self.valid = valid.reshape(self.out_height * self.out_width, kh * kw)  # [P, kh*kw]
        counts = np.bincount(self.child_ids, minlength=self.num_children + 1)[: self.num_children]
        # parent positions that see each child (0 for a child no parent sees)
        self.parent_positions = counts.reshape(height, width)  # [H, W]
        padded_counts = np.append(counts, 1)[child]  # [OH, OW, kh, kw]
        self.inverse_count = np.where(valid, 1.0 / padded_counts, 0.0).reshape(
            self.out_height * self.out_width, kh * kw
        )  # [P, kh*kw]

    def fold(self, patches, reduce="sum"):
        """Sums (or maxes) patch values back onto the child positions they came from.

        Args:
          patches: `[N, OH, OW, kh, kw, T]` (or `[N, OH, OW, kh*kw, T]`).
          reduce: 'sum' or 'max'. An unseen child gets 0 ('sum') or the dtype's lowest ('max').

        Returns:
          `[N, H, W, T]`.
        """
        segment_op = {"sum": tf.math.unsorted_segment_sum, "max": tf.math.unsorted_segment_max}[reduce]
        num_types = patches.shape[-1]
        batch = tf.shape(patches)[0]
        segments = self.num_children + 1  # + the dump segment of padded offsets
        flat = tf.reshape(patches, [batch, len(self.child_ids), num_types])  # [N, OH*OW*kh*kw, T]
        ids = tf.range(batch)[:, None] * segments + self.child_ids[None, :]  # [N, OH*OW*kh*kw]
        folded = segment_op(flat, ids, batch * segments)  # [N*(H*W+1), T]
        folded = tf.reshape(folded, [batch, segments, num_types])[:, : self.num_children]  # [N, H*W, T]
        return tf.reshape(folded, [batch, self.height, self.width, num_types])  # [N, H, W, T]

    def extract(self, children):
        """Patch extraction: `[N, H, W, D]` -> `[N, OH, OW, kh*kw*D]`, zeros at padded offsets."""
        kh, kw = self.kernel_size
        sh, sw = self.stride
        return tf.image.extract_patches(
            children, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1], rates=[1, 1, 1, 1], padding=self.padding
        )


class PatchLayout:
    """A convolutional capsule layer's children in routing's parent-major layout, and the E-step's reductions.

    Patch values are `[NP, 1 or O, KKI]`: parent positions ordered (n, oh, ow), KKI = kh*kw*I children ordered
    (kh, kw, i). A child is seen by up to ceil(K/s)^2 positions times O parent types.
    """

    def __init__(self, field, input_types, output_types, dtype, kernel="tf"):
        self.field, self.input_types, self.output_types, self.dtype = field, input_types, output_types, dtype
        self.kernel = kernel  # 'fused': `normalise` is one capsule_ops kernel; 'tf': TensorFlow ops
        self.offsets = field.kernel_size[0] * field.kernel_size[1]  # KK
        self.children = self.offsets * input_types  # KKI

    def extract(self, children):
        """Child values `[N, H, W, I]` at every parent's patch: `[NP, 1, KKI]`."""
        return tf.reshape(self.field.extract(children), [-1, 1, self.children])

    def constant(self, values, batch):
        """A per-(position, kernel offset) constant `[P, KK]`, repeated over types and batch: `[NP, 1, KKI]`."""
        per_type = np.repeat(values, self.input_types, axis=1)  # [P, KKI]
        ones = tf.ones([batch, 1, 1], self.dtype)
        return tf.reshape(tf.constant(per_type, self.dtype) * ones, [-1, 1, self.children])

    def over_parents(self, values, reduce, per_type, batch):
        """Each child's sum (or max) of `values` over the parents that see it, at every patch entry.

        Args:
          values: `[NP, O, KKI]`.
          reduce: 'sum' or 'max'.
          per_type: False: over every parent that sees the child (positions and types); True: over the
            positions of each parent type separately.
          batch: N.

        Returns:
          `[NP, 1, KKI]`, or `[NP, O, KKI]` when `per_type`.
        """
        field, kk, in_types, out_types = self.field, self.offsets, self.input_types, self.output_types
        if not per_type:
            over_types = {"sum": tf.reduce_sum, "max": tf.reduce_max}[reduce](values, axis=1)  # [NP, KKI]
            patch_major = tf.reshape(over_types, [batch, field.out_height, field.out_width, kk, in_types])
            return self.extract(field.fold(patch_major, reduce))  # [NP, 1, KKI]
        by_type = tf.reshape(values, [-1, out_types, kk, in_types])  # [NP, O, KK, I]
        by_type = tf.transpose(by_type, [0, 2, 1, 3])  # [NP, KK, O, I]: types become fold channels
        by_type = tf.reshape(by_type, [batch, field.out_height, field.out_width, kk, out_types * in_types])
        patches = field.extract(field.fold(by_type, reduce))  # [N, OH, OW, KK*O*I]
        patches = tf.reshape(patches, [-1, kk, out_types, in_types])  # [NP, KK, O, I]
        return tf.reshape(tf.transpose(patches, [0, 2, 1, 3]), [-1, out_types, self.children])  # [NP, O, KKI]

    def normalise(self, log_numerators, per_type, batch):
        """The E-step's R `[NP, O, KKI]`: exp(log numerator - log of the child's sum over the parents that see it
        (`over_parents`' per_type)), 0 at padded offsets.

        Args:
          log_numerators: log(a_j p_ij), `[NP, O, KKI]`.
          per_type, batch: as `over_parents`.
        """
        if self.kernel == "fused":
            ids = tf.constant(self.field.child_ids)  # [P*KK]
            field, in_types = self.field, self.input_types
            return capsule_ops.normalise_over_parents(log_numerators, ids, per_type, field.num_children, in_types)
        # A per-child shift (its largest numerator) makes every child's denominator >= 1.
        shift = tf.stop_gradient(self.over_parents(log_numerators, "max", per_type, batch))  # [NP, 1 or O, KKI]
        valid = self.constant(self.field.valid, batch)  # [NP, 1, KKI], 0 at padded offsets
        # A padded offset holds no child and gets no shift: zero its exponent so exp cannot overflow there.
        shifted = tf.exp((log_numerators - shift) * valid)  # [NP, O, KKI]
        log_denominator = _safe_log(self.over_parents(shifted, "sum", per_type, batch))  # [NP, 1 or O, KKI]
        return shifted * tf.exp(-log_denominator) * valid  # [NP, O, KKI]


# ----------------------------------------------------------------------------------------------
