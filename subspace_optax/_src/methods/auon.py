"""AuON: Frobenius-normalized Nesterov momentum with a cosh-RMS brake.

Maity, `AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates
<https://arxiv.org/abs/2509.24320>`_, 2025.

What the method computes, honestly stated: with ``X = M̂/‖M̂‖_F`` the brake is
``√mean(cosh²(γX)) ≈ 1 + γ²/(2N)`` for ``N`` entries (``Σ X² = 1``), so for
real layer sizes it is ``1 + O(1e-4)`` and AuON is, to that accuracy,
normalized Nesterov momentum with ``‖U‖_F ≈ 1`` (``√min(m, n)`` times smaller
than Muon's orthogonalized step at equal learning rate). The hybrid variant
runs Newton–Schulz steps on ``X`` before the brake.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src import arguments
from subspace_optax._src.transforms import auon as auon_lib


@arguments.declare_static_args('newton_schulz_steps', 'mask', 'matrix_mask')
def auon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    newton_schulz_steps: int = 0,
    gamma: float = 1.0,
    aspect_ratio_scale: bool = True,
    weight_decay: float = 0.0,
    mask: Optional[Any] = None,
    matrix_mask: Optional[Union[Any, Callable[[Any], Any]]] = None,
    adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """AuON on matrices, AdamW on everything else.

  Maity, `AuON <https://arxiv.org/abs/2509.24320>`_, 2025. For the leaves
  selected by ``matrix_mask`` (default: every leaf of rank >= 2):

  .. math::
    W \\leftarrow W - η\\,(\\sqrt{\\max(1, n_{out}/n_{in})}\\; U + λ W),

  with ``U`` from :func:`scale_by_auon`; other leaves (biases, norms; pass a
  mask to route embeddings here too, as the paper does) use ``optax.adamw``.
  Paper-era defaults: ``β = 0.95``, Nesterov, lr 0.02 in their runs (the
  packaged code uses 0.24). State: one momentum per matrix
  (:func:`subspace_optax.state_sizes.auon_bytes`).

  Args:
    learning_rate: AuON's learning rate.
    beta, nesterov, newton_schulz_steps, gamma: see :func:`scale_by_auon`.
    aspect_ratio_scale: apply ``√max(1, fan_out/fan_in)``.
    weight_decay: decoupled weight decay of the AuON leaves.
    mask: optax mask for that weight decay.
    matrix_mask: pytree (or callable params -> pytree) of bools, True for
      leaves optimized by AuON.
    adam_learning_rate: AdamW's learning rate (default: ``learning_rate``).
    adam_b1, adam_b2, adam_eps, adam_weight_decay: AdamW's hyper-parameters.

  Returns:
    An ``optax.GradientTransformation`` (an ``optax.multi_transform`` of AuON
    and AdamW); its ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.zeros(6)}
    >>> tx = so.auon(learning_rate=2e-2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> so.state_bytes(state) == so.state_sizes.auon_bytes(params)
    True
  """
  if adam_learning_rate is None:
    adam_learning_rate = learning_rate

  def labels(params):
    is_matrix = matrix_mask(params) if callable(matrix_mask) else matrix_mask
    if is_matrix is None:
      is_matrix = jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
    return jax.tree.map(lambda m: 'auon' if m else 'adam', is_matrix)

  return optax.partition(
      {
          'auon': optax.chain(
              auon_lib.scale_by_auon(beta, nesterov, newton_schulz_steps, gamma),
              auon_lib.scale_by_aspect_ratio() if aspect_ratio_scale else optax.identity(),
              optax.add_decayed_weights(weight_decay, mask),
              optax.scale_by_learning_rate(learning_rate),
          ),
          'adam': optax.adamw(
              adam_learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
              weight_decay=adam_weight_decay),
      },
      labels,
  )
