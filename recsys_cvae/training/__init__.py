"""Fitting the CVAE: tf.data input, tf.distribute strategies, callbacks, the EASE blend.

Imports `model/` and the contracts; never evaluation, baselines or pipeline
(`docs/architecture.md`).
"""
