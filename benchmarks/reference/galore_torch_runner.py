"""Drive galore-torch's ``GaLoreAdamW`` (PyPI ``galore-torch==1.0``) on a fixed
gradient stream and record its per-step updates and projectors.

The reference is used as published. Only to show how it depends on the
singular vectors' arbitrary signs, a run can swap its projector for
:class:`ConventionProjector`, which returns the same subspace under another
(equally valid) SVD sign convention, optionally with the signs aligned to the
previous projector as ``subspace_optax`` does. With ``convention='lapack'`` and
``align_signs=False`` it reproduces the published projector bit for bit (the
benchmark checks this).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# Sign conventions for singular vectors, all valid SVDs of the same matrix:
#   lapack    : whatever torch.linalg.svd(G) returns (the published reference);
#   transpose : the SVD of Gᵀ with the factors swapped (another backend's
#               choice: a LAPACK call on the transposed, i.e. row-major, data);
#   svd_flip  : each singular vector's largest-|entry| made positive
#               (scikit-learn's ``svd_flip``).
CONVENTIONS = ('lapack', 'transpose', 'svd_flip')


def max_abs_positive(vectors, axis: int):
  """Flip each vector (along ``axis``) so its largest-magnitude entry is > 0."""
  import torch  # pylint: disable=g-import-not-at-top

  index = torch.argmax(torch.abs(vectors), dim=axis, keepdim=True)
  signs = torch.sign(torch.take_along_dim(vectors, index, dim=axis))
  signs = torch.where(signs == 0, torch.ones_like(signs), signs)
  return vectors * signs


def _projector_class():
  # pylint: disable-next=g-import-not-at-top
  from galore_torch.galore_projector import GaLoreProjector

  class ConventionProjector(GaLoreProjector):
    """``GaLoreProjector`` ('std' only) with a chosen SVD sign convention."""

    def __init__(self, *args, convention='lapack', align_signs=False, **kwargs):
      super().__init__(*args, **kwargs)
      if convention not in CONVENTIONS:
        raise ValueError(f'convention must be one of {CONVENTIONS}')
      self.convention = convention
      self.align_signs = align_signs

    # The reference's signature (``type`` shadows the builtin).
    def get_orthogonal_matrix(self, weights, rank, type):  # pylint: disable=W0622
      import torch  # pylint: disable=g-import-not-at-top

      # The published projector computes the SVD in float32; a float64 run
      # (the benchmark's "exact" control) keeps float64.
      matrix = weights.data
      if matrix.dtype != torch.float64:
        matrix = matrix.float()
      if self.convention == 'transpose':
        u_t, _, vh_t = torch.linalg.svd(matrix.T, full_matrices=False)
        u, vh = vh_t.T, u_t.T
      else:
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
      # Basis vectors as columns, on the side the reference keeps.
      if type == 'right':
        vectors = vh[:rank, :].T
      elif type == 'left':
        vectors = u[:, :rank]
      else:
        raise ValueError(f'only proj_type="std" is supported, got {type}')
      if self.convention == 'svd_flip':
        vectors = max_abs_positive(vectors, axis=0)
      if self.align_signs and self.ortho_matrix is not None:
        old = self.ortho_matrix.T if type == 'right' else self.ortho_matrix
        dots = torch.sum(vectors * old, dim=0)
        vectors = vectors * torch.where(dots < 0, -1.0, 1.0)
      # No copy to contiguous memory: the published projector keeps the SVD's
      # strides, and the matmul's rounding depends on them.
      vectors = vectors.to(weights.dtype)
      return vectors.T if type == 'right' else vectors

  return ConventionProjector


def basis_columns(projector, shape: Sequence[int]) -> np.ndarray:
  """The projector's basis as a ``k x r`` matrix with orthonormal columns."""
  ortho = projector.ortho_matrix.detach().cpu().numpy()
  rows, columns = shape
  return ortho.T if rows >= columns else ortho  # 'right': stored r x n


def run_galore_adamw(
    gradients: Sequence[Sequence[np.ndarray]],
    *,
    rank: int,
    refresh: int,
    scale: float,
    learning_rate: float,
    betas: tuple[float, float],
    eps: float,
    convention: str | None = None,
    align_signs: bool = False,
    dtype: str = 'float32',
) -> dict[str, Any]:
  """Feed ``gradients[step][leaf]`` to ``GaLoreAdamW`` (``proj_type='std'``).

  Args:
    gradients: per step, one float32 matrix per parameter.
    convention: None runs the published ``GaLoreProjector``; a name from
      :data:`CONVENTIONS` runs :class:`ConventionProjector` with it.
    align_signs: with a convention, align each new projector's signs with the
      previous one (what ``subspace_optax`` does by default).
    dtype: 'float32' or 'float64' for the parameters, gradients and moments.
      The published projector computes its SVD in float32 either way;
      :class:`ConventionProjector` keeps float64 in a float64 run.

  Returns:
    ``updates[step][leaf]`` (the parameter change of each step),
    ``bases[step][leaf]`` (``k x r`` basis columns, refresh steps only) and
    ``state_bytes`` (bytes of every tensor in the optimizer state at the end).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from galore_torch import GaLoreAdamW  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  shapes = [tuple(g.shape) for g in gradients[0]]
  torch_dtype = {'float32': torch.float32, 'float64': torch.float64}[dtype]
  params = [torch.nn.Parameter(torch.zeros(s, dtype=torch_dtype)) for s in shapes]
  optimizer = GaLoreAdamW(
      [{'params': params, 'rank': rank, 'update_proj_gap': refresh,
        'scale': scale, 'proj_type': 'std'}],
      lr=learning_rate, betas=betas, eps=eps, weight_decay=0.0,
      no_deprecation_warning=True,
  )
  if convention is not None:
    projector_class = _projector_class()
    for p in params:  # The optimizer creates a projector only if none is set.
      optimizer.state[p]['projector'] = projector_class(
          rank, update_proj_gap=refresh, scale=scale, proj_type='std',
          convention=convention, align_signs=align_signs)
  updates, bases = [], {}
  for step, step_gradients in enumerate(gradients):
    for p, g in zip(params, step_gradients):
      with torch.no_grad():
        p.zero_()  # weight decay is 0, so W does not enter the update
      p.grad = torch.from_numpy(np.array(g, dtype=dtype))
    optimizer.step()
    updates.append([p.detach().numpy().copy() for p in params])
    if step % refresh == 0:
      bases[step] = [
          basis_columns(optimizer.state[p]['projector'], s)
          for p, s in zip(params, shapes)
      ]
  state_bytes = 0
  for p in params:
    for value in optimizer.state[p].values():
      if torch.is_tensor(value):
        state_bytes += value.numel() * value.element_size()
      elif hasattr(value, 'ortho_matrix'):
        state_bytes += value.ortho_matrix.numel() * value.ortho_matrix.element_size()
  return {'updates': updates, 'bases': bases, 'state_bytes': state_bytes}


def versions() -> dict[str, str]:
  import importlib.metadata  # pylint: disable=g-import-not-at-top

  out = {}
  for name in ('torch', 'galore-torch', 'transformers', 'bitsandbytes'):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = 'missing'
  return out
