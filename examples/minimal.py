"""The smallest complete use of subspace_optax: GaLore on a flax NNX model.

Fits a two-layer MLP to a random teacher network (data generated here, no
download) with AdamW and with GaLore, and prints the loss and the optimizer
state of each. Run from the repository root::

  python -m examples.minimal
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import subspace_optax as so


class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, width: int = 256):
    self.hidden = nnx.Linear(64, width, rngs=rngs)
    self.out = nnx.Linear(width, 16, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.gelu(self.hidden(x)))


def make_data(key, n: int = 2048):
  """Inputs and the outputs of a random teacher MLP."""
  teacher = MLP(nnx.Rngs(key), width=64)
  x = jax.random.normal(jax.random.fold_in(key, 1), (n, 64))
  return x, teacher(x)


@nnx.jit
def train_step(model, optimizer, x, y):
  loss_fn = lambda model: jnp.mean((model(x) - y) ** 2)
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def train(tx, steps: int = 300, seed: int = 0) -> tuple[float, int]:
  """Final training loss and optimizer-state bytes of ``tx``."""
  x, y = make_data(jax.random.key(seed))
  model = MLP(nnx.Rngs(seed + 1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for step in range(steps):
    batch = slice((step * 128) % 2048, (step * 128) % 2048 + 128)
    loss = train_step(model, optimizer, x[batch], y[batch])
  return float(loss), so.state_bytes(nnx.state(optimizer, nnx.OptState))


def main(steps: int = 300) -> dict[str, tuple[float, int]]:
  results = {
      'adamw': train(optax.adamw(3e-3), steps),
      # Rank: a quarter of each kernel's smaller side; biases keep full Adam.
      # GaLore's scale 0.25 shrinks the step, so its rate is higher.
      'galore': train(so.galore(3e-2, rank=0.25, refresh=50), steps),
  }
  for name, (loss, state) in results.items():
    print(f'{name:>7}: final loss {loss:.4f}, optimizer state {state:,} bytes')
  return results


if __name__ == '__main__':
  main()
