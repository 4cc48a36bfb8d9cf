"""Byte-level LLaMA-style language model trained with flax NNX and optax.

See ``python -m examples.lm.train --help``.
"""
