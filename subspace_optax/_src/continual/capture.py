"""Each layer's inputs of a flax NNX model, shaped for :func:`gpm_memory`.

GPM (Saha, Garg, Roy, `arXiv 2103.09762 <https://arxiv.org/abs/2103.09762>`_)
protects, for a layer ``y = x W``, the span of the inputs ``x`` it saw on
earlier tasks. :func:`layer_inputs` collects those inputs from any NNX model
with flax's own mechanism: for the call it wraps each layer type's
``__call__`` so that it ``sow``s its input as an ``nnx.Intermediate`` (as
``nnx.capture(..., method_outputs=...)`` does for outputs), runs the model
under :func:`flax.nnx.capture`, restores the classes, and returns the inputs
at the path of the parameter they multiply:

* ``nnx.Linear`` (``y = x K``, ``K`` is ``(in, out)``): the input ``x`` at
  ``.../kernel``, as ``(samples, in)``;
* ``nnx.Embed`` (``y = onehot(i) E``, ``E`` is ``(vocab, features)``): the
  one-hot rows of the token ids at ``.../embedding``, ``(samples, vocab)``
  (``samples x vocab`` floats: fine for byte or character vocabularies; for a
  large vocabulary leave ``nnx.Embed`` out of ``layer_types``).

Layers built with ``nnx.vmap`` and run with ``nnx.scan`` (stacked kernels
``(layers, in, out)``) get stacked inputs ``(layers, samples, in)``: every
leading axis of a parameter beyond its last two is a batch axis, as in the
rest of the library. A layer called several times (shared weights) gets the
inputs of every call, concatenated along the samples.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

_PARAMETER = {'Linear': 'kernel', 'Embed': 'embedding'}


def _parameter_name(cls) -> str:
  """``'kernel'`` / ``'embedding'`` for subclasses of nnx.Linear / nnx.Embed."""
  for base in cls.__mro__:
    if base.__module__.startswith('flax.nnx') and base.__name__ in _PARAMETER:
      return _PARAMETER[base.__name__]
  raise TypeError(
      f'layer_inputs supports nnx.Linear and nnx.Embed (and their '
      f'subclasses); got {cls.__name__}. Sow the input of other layers '
      "yourself with `self.sow(nnx.Intermediate, '<param name>', x)`.")


@contextlib.contextmanager
def _sowing_inputs(classes):
  """Temporarily make the ``__call__`` of ``classes`` sow its first argument.

  Each class is patched where its ``__call__`` is defined (a subclass that
  inherits it shares the patch, so no input is sown twice) and restored on
  exit, even when the call raises.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  owners = {next(c for c in cls.__mro__ if '__call__' in c.__dict__): cls
            for cls in classes}
  originals = {}
  try:
    for owner, cls in owners.items():
      name, call = _parameter_name(cls), owner.__dict__['__call__']
      originals[owner] = call

      def sowing(self, inputs, *args, _call=call, _name=name, **kwargs):
        outputs = _call(self, inputs, *args, **kwargs)  # its own checks first
        if _name == 'embedding':
          inputs = jax.nn.one_hot(inputs, self.num_embeddings,
                                  dtype=jnp.float32)
        self.sow(nnx.Intermediate, _name, inputs)
        return outputs

      owner.__call__ = functools.wraps(call)(sowing)
    yield
  finally:
    for owner, call in originals.items():
      owner.__call__ = call


def layer_inputs(model, *args, layer_types: Sequence[type] = None,
                 **kwargs) -> Any:
  """The inputs of each ``nnx.Linear`` / ``nnx.Embed`` of ``model`` on ``args``.

  Runs ``model(*args, **kwargs)`` once (pass a function of the model through
  ``model`` only if it is an ``nnx.Module``; to call a method, call this on the
  module whose ``__call__`` it is).

  Args:
    model: a flax NNX module.
    *args: the call's positional arguments (a calibration batch of the
      finished task, e.g. a few thousand tokens or samples).
    **kwargs: the call's keyword arguments.
    layer_types: the layer classes whose inputs to capture (default
      ``(nnx.Linear, nnx.Embed)``; subclasses are included).

  Returns:
    A nested dict with the structure of ``nnx.to_pure_dict(nnx.state(model,
    nnx.Param))``: at each captured parameter its layer's inputs
    ``(*batch, samples, features)`` (float32), None at every other parameter.
    Pass it to :func:`gpm_memory` with params of that structure.

  Raises:
    ValueError: ``model`` is not an NNX module, or captured no input at all.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from subspace_optax import continual as cl
    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> inputs = cl.layer_inputs(model, jnp.ones((5, 4)))
    >>> inputs['kernel'].shape, inputs['bias']
    ((5, 4), None)
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if not isinstance(model, nnx.Module):
    raise ValueError(
        f'layer_inputs needs a flax nnx.Module, got {type(model).__name__}.')
  layer_types = tuple(layer_types or (nnx.Linear, nnx.Embed))
  classes = {type(m) for _, m in nnx.iter_modules(model)
             if isinstance(m, layer_types)}
  with _sowing_inputs(classes):
    _, captured = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
  captured = nnx.to_pure_dict(captured)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def pick(path, parameter):
    node = captured
    for key in path:
      name = getattr(key, 'key', getattr(key, 'idx', None))
      if not isinstance(node, dict) or name not in node:
        return None
      node = node[name]
    calls = node if isinstance(node, (tuple, list)) else (node,)
    shape = jnp.shape(parameter)
    batch, features = shape[:-2], shape[-2]
    rows = [jnp.asarray(x, jnp.float32).reshape(batch + (-1, features))
            for x in calls]
    return jnp.concatenate(rows, axis=-2)

  out = jax.tree_util.tree_map_with_path(pick, params)
  if all(x is None for x in jax.tree.leaves(out, is_leaf=lambda x: x is None)):
    raise ValueError(
        f'layer_inputs captured no input: the model has no layer of the types '
        f'{[t.__name__ for t in layer_types]} that ran on these arguments.')
  return out
