"""Routing internals: what a routed capsule layer computes, below the layers of capsule_layers.py.

`em_routing` is the paper's Procedure 1 (M-step, E-step, the driver loop, the inverse-temperature schedule),
`vote_contractions` its sums over the votes (TensorFlow ops, or the fused kernels that recompute the votes),
`receptive_field` the geometry of convolutional capsule layers (patches, their centres, the fold of patch
values back onto child positions), `layer_base` the layers' base classes (the tf.layers conventions, the
argument checks, the routed layers' variables and routing call), and `diagnostics` the routing statistics
behind TensorBoard's routing scalars and test mode's routing.png. These modules may import only TensorFlow,
NumPy, `capsule_ops` and one another; the layers (capsule_layers.py), the model and the run machinery import
them, never the other way round.
"""
