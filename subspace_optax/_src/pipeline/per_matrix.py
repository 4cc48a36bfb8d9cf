"""One matrix at a time: the full-size stages of an update over a stacked leaf.

A leaf with batch axes (the ``(L, m, n)`` kernels of ``nnx.scan`` stacks) is
``L`` matrices, each with its own basis. ``jax.vmap`` over the stack axis
computes every full-size intermediate of a stage (the float32 gradient view,
an SVD's workspace, ``QN``) for the whole stack at once; at LLaMA-7B sizes
these temporaries were tens of GB. The stages that touch full-size arrays
(the refresh, ``C = QᵀG`` and ``α QN``) therefore run one matrix at a time
with :func:`over_matrices` (a ``lax.scan`` over the flattened batch axes), read
their matrix from the raw gradient (:func:`stacked`, in its own dtype) and
cast it to float32 only there (:func:`view`): the temporaries are those of
one matrix. Small stages (transitions, ``r x r``) keep ``jax.vmap``.

The maths is the same per matrix; only the schedule changes. The stages
whose output is the update itself (the unprojection, the residual path) are
vectorised on GPUs (:func:`over_matrices_on_cpu`): there the whole stack's
``QN`` fuses with the cast and the caller's ``p + u``, while a loop's output
is a materialised update tree. Between the stages, a stack's new bases and
its coefficients ``C`` and ``N`` are stack-sized; on the CPU
:mod:`~subspace_optax._src.pipeline.layer_loop` removes them by running the
whole update one layer at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from subspace_optax._src.pipeline import layout as layout_lib
from subspace_optax._src.pipeline import sharding


def stacked(x: jax.Array, layout: layout_lib.MatrixLayout) -> jax.Array:
  """The leaf with its batch axes first (transposed only if they are not),
  in its own dtype; :func:`matrix_layout` describes one matrix of it."""
  rest = tuple(a for a in range(x.ndim) if a not in layout.batch_axes)
  order = layout.batch_axes + rest
  return x if order == tuple(range(x.ndim)) else jnp.transpose(x, order)


def unstacked(x: jax.Array, layout: layout_lib.MatrixLayout) -> jax.Array:
  """Inverse of :func:`stacked`."""
  rest = tuple(a for a in range(x.ndim) if a not in layout.batch_axes)
  order = layout.batch_axes + rest
  if order == tuple(range(x.ndim)):
    return x
  return jnp.transpose(x, tuple(order.index(a) for a in range(x.ndim)))


@functools.lru_cache(maxsize=None)
def matrix_layout(layout: layout_lib.MatrixLayout) -> layout_lib.MatrixLayout:
  """The layout of one matrix of :func:`stacked` (no batch axes)."""
  if not layout.batch_axes:
    return layout
  rest = [a for a in range(len(layout.shape)) if a not in layout.batch_axes]
  position = {a: i for i, a in enumerate(rest)}
  return dataclasses.replace(
      layout, shape=tuple(layout.shape[a] for a in rest), batch_axes=(),
      reduction_axes=tuple(position[a] for a in layout.reduction_axes),
      output_axes=tuple(position[a] for a in layout.output_axes))


def view(x: jax.Array, layout: layout_lib.MatrixLayout) -> jax.Array:
  """One matrix of :func:`stacked` as its oriented float32 ``(k, l)`` view."""
  return layout_lib.matrix_view(x, matrix_layout(layout)).astype(jnp.float32)


def to_leaf(m: jax.Array, layout: layout_lib.MatrixLayout) -> jax.Array:
  """One oriented ``(k, l)`` matrix back in the layout of :func:`stacked`."""
  return layout_lib.leaf_from_matrix(m, matrix_layout(layout))


def over_matrices(fn: Callable[..., Any], num_batch_axes: int,
                  *args: Any, into: jax.Array | None = None) -> Any:
  """``fn`` on each matrix of ``args`` (pytrees with ``num_batch_axes``
  leading batch axes), one matrix at a time; outputs stacked the same way.

  Without batch axes ``fn(*args)``; otherwise a ``lax.scan`` over the
  flattened batch axes that carries the stacks through an
  ``optimization_barrier``, so the temporaries of ``fn`` are those of one
  matrix. With ``into`` (an array of the stacked output's shape and dtype;
  ``fn`` returns one array), each matrix's output is written in place of
  ``into``'s: the output takes ``into``'s memory where nothing else reads it
  (a gradient stack whose update this is), instead of a new stack beside it.
  """
  if num_batch_axes == 0:
    return fn(*args)
  batch_shape = jax.tree.leaves(args)[0].shape[:num_batch_axes]
  flatten = lambda x: x.reshape((-1,) + x.shape[num_batch_axes:])
  flat = jax.tree.map(flatten, args)
  size = jax.tree.leaves(flat)[0].shape[0]
  if size == 0:  # An empty stack (the layer loop's zero-size placeholders).
    return layout_lib.batched(fn, num_batch_axes)(*args)

  def one(stacks, i):
    # The stacks are carried through a barrier, not closed over: XLA would
    # otherwise hoist a conversion of the whole stack (e.g. bfloat16 ->
    # float32) out of the loop as loop-invariant code.
    stacks = jax.lax.optimization_barrier(stacks)
    return stacks, fn(*jax.tree.map(
        lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), stacks))

  first = lambda x: jax.lax.index_in_dim(x, 0, keepdims=False)
  if into is not None and (
      sharding.explicit_spec(jax.eval_shape(fn, *jax.tree.map(first, flat)))
      != sharding.explicit_spec(first(flatten(into)))):
    into = None  # An Explicit mesh: the output is not sharded as ``into``.
  if into is None:
    _, out = jax.lax.scan(one, flat, jnp.arange(size))
    return jax.tree.map(lambda y: y.reshape(batch_shape + y.shape[1:]), out)

  def write(carry, i):
    out, stacks = carry
    stacks, y = one(stacks, i)
    return (jax.lax.dynamic_update_index_in_dim(out, y, i, 0), stacks), None

  (out, _), _ = jax.lax.scan(write, (flatten(into), flat), jnp.arange(size))
  return out.reshape(into.shape)


def over_matrices_on_cpu(fn: Callable[..., Any], num_batch_axes: int,
                         *args: Any, into: jax.Array | None = None) -> Any:
  """:func:`over_matrices` (with ``into``) when lowered for the CPU,
  ``jax.vmap`` on GPUs.

  For the stages whose output is the update (the unprojection ``α QN``, the
  residual path). Looped, a stack's float32 temporaries are one matrix's,
  and the update is written in place of the gradient (``into``); vectorised,
  XLA fuses ``QN``, its cast and the optimizer's ``p + u``, and no update
  tree is held. At LLaMA-7B (bfloat16 params, batch 16 x 256, remat) the
  whole-tree train step with 8-bit GaLore, compiled ahead of time for an
  H100, peaks at 36.6 GB vectorised against 50.1 GB looped
  (``benchmarks.per_layer_memory --target h100``), so GPUs vectorise. The
  CPU keeps the loop, which bounds the update's own temporaries
  (``benchmarks.optimizer_temporaries``); there the vectorised train step
  compiled to 72.1 GB against 86.1 looped before the CPU's layer loop, and
  the layer loop, which writes each update in place of its gradient,
  compiles to 64.1 GB. TPUs, not measured, take the loop. Same maths on
  every platform.
  """
  if num_batch_axes == 0:
    return fn(*args)
  return on_platform(
      *args, cpu=functools.partial(over_matrices, fn, num_batch_axes,
                                   into=into),
      gpu=layout_lib.batched(fn, num_batch_axes))


def on_platform(*args: Any, cpu: Callable[..., Any],
                gpu: Callable[..., Any]) -> Any:
  """``gpu(*args)`` when lowered for cuda or rocm, else ``cpu(*args)``.

  ``jax.lax.platform_dependent`` under a trace (the platform is the
  lowering's, so ahead-of-time compiles for another target take its
  branch); called eagerly on concrete arrays, the branch of their devices'
  platform directly (an eager ``platform_dependent`` would compile both
  branches on every call).
  """
  leaves = jax.tree.leaves(args)
  if leaves and not any(isinstance(x, jax.core.Tracer) for x in leaves):
    arrays = [x for x in leaves if isinstance(x, jax.Array)]
    platform = (next(iter(arrays[0].devices())).platform if arrays
                else jax.default_backend())
    return (gpu if platform == 'gpu' else cpu)(*args)
  return jax.lax.platform_dependent(*args, cuda=gpu, rocm=gpu, default=cpu)
