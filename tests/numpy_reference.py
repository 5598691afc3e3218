"""Float64 NumPy loop reference of the Matrix Capsules with EM Routing layers, for tests.

Independent, deliberately slow implementation of PrimaryCaps, ConvCaps, ClassCaps and
EM routing (Hinton, Sabour, Frosst, ICLR 2018), written with plain Python loops straight
from the math spec so that the TensorFlow layers can be checked against it.

Index conventions used throughout:
    * pose flattening: h = r * POSE_DIM + c for the 4x4 pose / vote matrix entry (r, c).
    * conv child index  = (h * W + w) * I + i      (input grid H x W, I input types).
    * conv parent index = (oh * OW + ow) * O + o   (output grid OH x OW, O output types).
    * class parent index = c.
"""

import math

import numpy as np

POSE_DIM = 4  # capsule poses are POSE_DIM x POSE_DIM matrices
POSE_SIZE = POSE_DIM * POSE_DIM  # number of entries in a flattened pose / vote
VAR_FLOOR = 5e-4  # added to every routing variance so log(var) stays finite
LAMBDA_DECAY = 0.95  # inverse-temperature schedule: lam_t = final * (1 - LAMBDA_DECAY**(t+1))
COST_VAR_EPS = 1e-6  # standardised costs: added to the variance of a position's costs
CELL_CENTRE = 0.5  # coordinate addition uses the centre (h + CELL_CENTRE) of each grid cell
SAFE_DIVIDE_EPSILON = 1e-9  # the layers' divide guard (mass 0 gives a mean of 0, not NaN)
OFFICIAL_BETA_A_SCALE = 5000.0  # the authors' released code: logit = lam * (... - 5000 * beta_a)


def _pair(value):
    """Returns an (a, b) tuple from an int or a 2-sequence."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _log_sigmoid(x):
    """log(sigmoid(x)) = -log(1 + exp(-x)), overflow-free."""
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _sigmoid(x):
    return np.exp(_log_sigmoid(x))


def _geometry_1d(size, kernel, stride, padding):
    """Returns (out_size, pad_before) for one spatial dimension (tf.nn.conv2d rule)."""
    if padding == "VALID":
        return (size - kernel) // stride + 1, 0
    if padding == "SAME":
        out = int(math.ceil(size / stride))
        pad_total = max((out - 1) * stride + kernel - size, 0)
        return out, pad_total // 2
    raise ValueError("padding must be VALID or SAME, got %r" % (padding,))


def conv_geometry(height, width, kernel_size, stride, padding):
    """Output size and leading padding of a conv as tf.nn.conv2d computes them.

    Args:
        height, width: input grid size.
        kernel_size: int or (kh, kw); stride: int or (sh, sw); padding: 'VALID' or 'SAME'.

    Returns:
        (out_h, out_w, pad_top, pad_left).
    """
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    out_h, pad_top = _geometry_1d(height, kh, sh, padding)
    out_w, pad_left = _geometry_1d(width, kw, sw, padding)
    return out_h, out_w, pad_top, pad_left


def _receptive_field(height, width, kernel_size, stride, padding):
    """Yields (oh, ow, kh, kw, h, w) for every parent cell, kernel offset and in-bounds child.

    Child cell h = oh*sh + kh - pad_top, w = ow*sw + kw - pad_left; offsets in padding are
    skipped (they see no child).
    """
    k_h, k_w = _pair(kernel_size)
    s_h, s_w = _pair(stride)
    out_h, out_w, pad_top, pad_left = conv_geometry(height, width, kernel_size, stride, padding)
    for oh in range(out_h):
        for ow in range(out_w):
            for kh in range(k_h):
                for kw in range(k_w):
                    h = oh * s_h + kh - pad_top
                    w = ow * s_w + kw - pad_left
                    if 0 <= h < height and 0 <= w < width:
                        yield oh, ow, kh, kw, h, w


def _conv2d(x, kernel, stride, padding):
    """Loop cross-correlation. x [N,H,W,C], kernel [KH,KW,C,F] -> [N,OH,OW,F]."""
    n, height, width, _ = x.shape
    k_h, k_w, _, filters = kernel.shape
    out_h, out_w, _, _ = conv_geometry(height, width, (k_h, k_w), stride, padding)
    out = np.zeros((n, out_h, out_w, filters), np.float64)
    for b in range(n):
        for oh, ow, kh, kw, h, w in _receptive_field(height, width, (k_h, k_w), stride, padding):
            out[b, oh, ow] += x[b, h, w] @ kernel[kh, kw]
    return out


def primary_caps_reference(x, pose_kernel, pose_bias, act_kernel, act_bias, stride=1, padding="VALID"):
    """PrimaryCaps layer.

    Args:
        x: features [N, H, W, C].
        pose_kernel, pose_bias: [k, k, C, T*16], [T*16]; channel t*16 + r*4 + col is pose
            entry (r, col) of type t.
        act_kernel, act_bias: [k, k, C, T], [T].
        stride: int or (sh, sw); padding: 'VALID' or 'SAME'.

    Returns:
        poses [N, OH, OW, T, 4, 4], acts [N, OH, OW, T] (float64).
    """
    x = np.asarray(x, np.float64)
    pose = _conv2d(x, np.asarray(pose_kernel, np.float64), stride, padding) + pose_bias
    logits = _conv2d(x, np.asarray(act_kernel, np.float64), stride, padding) + act_bias
    n, out_h, out_w, num_types = logits.shape
    poses = pose.reshape(n, out_h, out_w, num_types, POSE_DIM, POSE_DIM)
    return poses, _sigmoid(logits)


def em_routing_reference(
    votes,
    child_acts,
    sees,
    beta_v,
    beta_a,
    parent_type,
    iterations,
    final_lambda,
    standardise_costs=False,
    activation_form="paper",
    mean_momentum=0.0,
    mass_epsilon=0.0,
    normalise_over="positions_and_types",
    cost_scale=0.0,
):
    """EM routing (paper Procedure 1) for ONE example over an explicit bipartite graph.

    Args:
        votes: [num_children, num_parents, 16]; only entries where sees is True are used.
        child_acts: [num_children].
        sees: bool [num_children, num_parents]; True where parent j sees child i.
        beta_v, beta_a: [num_parent_types].
        parent_type: int [num_parents], o(j).
        iterations, final_lambda: number of routing iterations (>= 1), final inverse temperature.
        standardise_costs: if True, the activation logit is lam * (beta_a + (mean - cost) /
            sqrt(var + 1e-6)), mean and var over the parents of one position (parent j's position
            is j // number of parent types).
        activation_form: 'paper' (lam * (beta_a - sum_h cost_h)) or 'official' (the authors' released
            code: lam * (s_j * (-sum_h log var_h - 16 beta_v (log 2pi + 1)) - 5000 beta_a)).
        mean_momentum: m in mu_j = (1 - m) * sum_i r_i V_i / s_j + m * mu_j of the previous iteration (0
            before the first); var is measured around that mu.
        mass_epsilon: added to s_j = sum_i r_ij.
        normalise_over: 'positions_and_types' (each child's R sums to 1 over all its parents) or
            'positions' (over the parents of each type separately; R starts at 1 / number of types).
        cost_scale: s > 0: the activation logit sees s_j * s * (number of parent types) / (children of a full
            receptive field) in place of s_j (IBM, Gritzman 2019); 0: s_j.

    Returns:
        mu [num_parents, 16], parent_acts [num_parents], R [num_children, num_parents] (the
        assignments used by the last M-step, zero where not seen), and a list of the
        per-iteration parent activations (each [num_parents]).
    """
    votes = np.asarray(votes, np.float64)
    child_acts = np.asarray(child_acts, np.float64)
    sees = np.asarray(sees, bool)
    num_children, num_parents = sees.shape
    parents_of = [[j for j in range(num_parents) if sees[i, j]] for i in range(num_children)]
    children_of = [[i for i in range(num_children) if sees[i, j]] for j in range(num_parents)]

    num_types = len(beta_a)
    full_field = max(len(children) for children in children_of)  # children per parent, padding included
    logit_mass_factor = cost_scale * num_types / full_field if cost_scale else 1.0
    # The parents each child is normalised over: all of them, or those of one type at a time.
    if normalise_over == "positions":
        groups = [
            [[j for j in parents_of[i] if parent_type[j] == o] for o in range(num_types)] for i in range(num_children)
        ]
    else:
        groups = [[parents_of[i]] for i in range(num_children)]
    assign = np.zeros((num_children, num_parents), np.float64)
    for i in range(num_children):
        for j in parents_of[i]:
            assign[i, j] = 1.0 / (num_types if normalise_over == "positions" else len(parents_of[i]))

    mu = np.zeros((num_parents, POSE_SIZE), np.float64)
    var = np.zeros((num_parents, POSE_SIZE), np.float64)
    parent_acts = np.zeros(num_parents, np.float64)
    log_parent_acts = np.zeros(num_parents, np.float64)  # log a_j, exact even if a_j underflows
    total_cost = np.zeros(num_parents, np.float64)  # sum_h cost_h of each parent
    masses = np.zeros(num_parents, np.float64)  # s_j
    history = []
    for t in range(iterations):
        lam = final_lambda * (1.0 - LAMBDA_DECAY ** (t + 1))
        # M-step.
        for j in range(num_parents):
            o = parent_type[j]
            r = {i: assign[i, j] * child_acts[i] for i in children_of[j]}
            s_j = sum(r.values()) + mass_epsilon
            # The layers' guard against a parent with no active child (mass 0): divide by s_j + 1e-9.
            divisor = s_j if mass_epsilon else s_j + SAFE_DIVIDE_EPSILON
            new_mu = sum(r[i] * votes[i, j] for i in children_of[j]) / divisor
            mu[j] = (1.0 - mean_momentum) * new_mu + mean_momentum * mu[j]  # mu[j] is 0 before the first
            var[j] = sum(r[i] * (votes[i, j] - mu[j]) ** 2 for i in children_of[j]) / divisor
            var[j] += VAR_FLOOR
            masses[j] = s_j * logit_mass_factor
            cost = (beta_v[o] + 0.5 * np.log(var[j])) * masses[j]
            total_cost[j] = np.sum(cost)
        for j in range(num_parents):
            o = parent_type[j]
            if activation_form == "official":
                fit = -np.sum(np.log(var[j])) - POSE_SIZE * beta_v[o] * (math.log(2.0 * math.pi) + 1.0)
                logit = lam * (masses[j] * fit - OFFICIAL_BETA_A_SCALE * beta_a[o])
            elif standardise_costs:
                group = total_cost[[k for k in range(num_parents) if k // len(beta_a) == j // len(beta_a)]]
                logit = lam * (beta_a[o] + (group.mean() - total_cost[j]) / math.sqrt(group.var() + COST_VAR_EPS))
            else:
                logit = lam * (beta_a[o] - total_cost[j])
            log_parent_acts[j] = _log_sigmoid(logit)
            parent_acts[j] = math.exp(log_parent_acts[j])
        history.append(parent_acts.copy())
        if t == iterations - 1:
            break
        # E-step, normalised in log space with a max shift.
        new_assign = np.zeros_like(assign)
        for i in range(num_children):
            for group in groups[i]:
                if not group:
                    continue
                logits = []
                for j in group:
                    diff = votes[i, j] - mu[j]
                    log_p = -np.sum(diff**2 / (2.0 * var[j]) + 0.5 * np.log(2.0 * math.pi * var[j]))
                    logits.append(log_parent_acts[j] + log_p)
                shift = max(logits)
                exp_terms = [math.exp(logit - shift) for logit in logits]
                total = sum(exp_terms)
                for j, term in zip(group, exp_terms):
                    new_assign[i, j] = term / total
        assign = new_assign
    return mu, parent_acts, assign, history


def conv_caps_reference(
    poses,
    acts,
    weights,
    beta_v,
    beta_a,
    kernel_size,
    stride,
    padding,
    iterations,
    final_lambda,
    standardise_costs=False,
    **form,
):
    """ConvCaps layer with EM routing.

    Args:
        poses: [N, H, W, I, 4, 4].
        acts: [N, H, W, I].
        weights: [K, K, I, O, 4, 4].
        beta_v, beta_a: [O].
        kernel_size: int or (kh, kw); stride: int or (sh, sw); padding: 'VALID' or 'SAME'.
        iterations, final_lambda, standardise_costs: routing settings.
        form: the routing form's keyword arguments of em_routing_reference.

    Returns:
        out_poses [N, OH, OW, O, 4, 4], out_acts [N, OH, OW, O], and a list (one per example)
        of R [H*W*I, OH*OW*O]; child index (h*W + w)*I + i, parent index (oh*OW + ow)*O + o.
    """
    poses, acts, weights = (np.asarray(v, np.float64) for v in (poses, acts, weights))
    n, height, width, num_in = poses.shape[:4]
    num_out = weights.shape[3]
    out_h, out_w, _, _ = conv_geometry(height, width, kernel_size, stride, padding)
    num_children = height * width * num_in
    num_parents = out_h * out_w * num_out
    parent_type = [j % num_out for j in range(num_parents)]

    out_poses = np.zeros((n, out_h, out_w, num_out, POSE_DIM, POSE_DIM), np.float64)
    out_acts = np.zeros((n, out_h, out_w, num_out), np.float64)
    assignments = []
    for b in range(n):
        sees = np.zeros((num_children, num_parents), bool)
        votes = np.zeros((num_children, num_parents, POSE_SIZE), np.float64)
        for oh, ow, kh, kw, h, w in _receptive_field(height, width, kernel_size, stride, padding):
            for i in range(num_in):
                child = (h * width + w) * num_in + i
                for o in range(num_out):
                    parent = (oh * out_w + ow) * num_out + o
                    sees[child, parent] = True
                    vote = poses[b, h, w, i] @ weights[kh, kw, i, o]  # pose on the left
                    votes[child, parent] = vote.reshape(POSE_SIZE)
        child_acts = acts[b].reshape(num_children)  # row-major == (h*W + w)*I + i
        mu, parent_acts, assign, _ = em_routing_reference(
            votes, child_acts, sees, beta_v, beta_a, parent_type, iterations, final_lambda, standardise_costs, **form
        )
        out_poses[b] = mu.reshape(out_h, out_w, num_out, POSE_DIM, POSE_DIM)
        out_acts[b] = parent_acts.reshape(out_h, out_w, num_out)
        assignments.append(assign)
    return out_poses, out_acts, assignments


def class_caps_reference(
    poses,
    acts,
    weights,
    beta_v,
    beta_a,
    iterations,
    final_lambda,
    standardise_costs=False,
    coordinate_offsets=None,
    **form,
):
    """ClassCaps layer: every grid cell is a child; votes get coordinate addition.

    Args:
        poses: [N, H, W, I, 4, 4].
        acts: [N, H, W, I].
        weights: [I, C, 4, 4], shared over positions.
        beta_v, beta_a: [C].
        iterations, final_lambda, standardise_costs: routing settings.
        coordinate_offsets: None (the paper's coordinate addition) or [H, W, 16], added to every vote
            of a child at (h, w).
        form: the routing form's keyword arguments of em_routing_reference.

    Returns:
        out_poses [N, C, 4, 4], out_acts [N, C]. (Child index (h*W + w)*I + i, parent c.)
    """
    poses, acts, weights = (np.asarray(v, np.float64) for v in (poses, acts, weights))
    n, height, width, num_in = poses.shape[:4]
    num_classes = weights.shape[1]
    num_children = height * width * num_in
    sees = np.ones((num_children, num_classes), bool)
    out_poses = np.zeros((n, num_classes, POSE_DIM, POSE_DIM), np.float64)
    out_acts = np.zeros((n, num_classes), np.float64)
    for b in range(n):
        votes = np.zeros((num_children, num_classes, POSE_SIZE), np.float64)
        for h in range(height):
            for w in range(width):
                for i in range(num_in):
                    child = (h * width + w) * num_in + i
                    for c in range(num_classes):
                        vote = poses[b, h, w, i] @ weights[i, c]
                        if coordinate_offsets is not None:
                            vote += np.reshape(coordinate_offsets[h, w], (POSE_DIM, POSE_DIM))
                        else:
                            # Coordinate addition: scaled row / column of the cell centre go into
                            # the first two entries of the vote's right-hand column.
                            vote[0, POSE_DIM - 1] += (h + CELL_CENTRE) / height
                            vote[1, POSE_DIM - 1] += (w + CELL_CENTRE) / width
                        votes[child, c] = vote.reshape(POSE_SIZE)
        mu, parent_acts, _, _ = em_routing_reference(
            votes,
            acts[b].reshape(num_children),
            sees,
            beta_v,
            beta_a,
            list(range(num_classes)),
            iterations,
            final_lambda,
            standardise_costs,
            **form,
        )
        out_poses[b] = mu.reshape(num_classes, POSE_DIM, POSE_DIM)
        out_acts[b] = parent_acts
    return out_poses, out_acts


def fold_reference(patches, height, width, kernel_size, stride, padding):
    """Brute-force sum of patch values back onto their child positions.

    Args:
        patches: [N, OH, OW, KH, KW, I].
        height, width: child grid size.
        kernel_size: int or (kh, kw); stride: int or (sh, sw); padding: 'VALID' or 'SAME'.

    Returns:
        [N, H, W, I]; values at offsets that fall in the padding are dropped.
    """
    patches = np.asarray(patches, np.float64)
    n, _, _, k_h, k_w, channels = patches.shape
    assert (k_h, k_w) == _pair(kernel_size), "patch shape does not match kernel_size"
    out = np.zeros((n, height, width, channels), np.float64)
    for b in range(n):
        for oh, ow, kh, kw, h, w in _receptive_field(height, width, kernel_size, stride, padding):
            out[b, h, w] += patches[b, oh, ow, kh, kw]
    return out
