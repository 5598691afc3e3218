"""Routing internals: what a routed capsule layer computes, below the layers of capsule_layers.py.

`em_routing` is the paper's Procedure 1 (M-step, E-step, the driver loop, the inverse-temperature schedule),
`receptive_field` the geometry of convolutional capsule layers (patches, their centres, the fold of patch
values back onto child positions), and `diagnostics` the routing statistics behind TensorBoard's routing
scalars and test mode's routing.png. These modules may import only TensorFlow, NumPy and `capsule_ops`; the
layers (capsule_layers.py), the model and the run machinery import them, never the other way round.
"""
