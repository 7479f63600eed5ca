"""Examples/s of the MNIST CNN's training step: jaxbn vs flax.linen.BatchNorm.

Both models are `training.models.MnistCNN` with the same convolutions, dense
layers, optimizer (the default config's Adam + one-cycle) and the same jitted,
state-donating `training.steps.train_step`; only the three BN layers
differ. A third row times the same CNN without BN: the difference to it is
what the BN layers cost. Timings alternate between the variants in every
repeat (so all see the same machine load) and the table reports medians.

  python benchmarks/train_step.py                 # batch 128, as configs/mnist_bn.py
  python benchmarks/train_step.py --batch_size=512 --repeats=15
  python benchmarks/train_step.py --tiny          # a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402

from configs import mnist_bn  # noqa: E402
from jaxbn import linen as jaxbn_linen  # noqa: E402
from training import distributed  # noqa: E402
from training import input_pipeline  # noqa: E402
from training import models  # noqa: E402
from training import optimizers  # noqa: E402
from training import steps  # noqa: E402
from training import train_state  # noqa: E402


# The BN layers' module (Keras' momentum and epsilon, as the model passes
# them); None: the same CNN without BN layers, the floor that shows what BN costs.
IMPLEMENTATIONS = {"jaxbn": jaxbn_linen.BatchNorm, "flax.linen": nn.BatchNorm,
                   "no BN": None}


def _compiled_step(norm, batch_size: int, steps_per_epoch: int):
  config = mnist_bn.get_config()
  config.batch_size = batch_size
  model = models.MnistCNN(use_bn=norm is not None, norm=norm or jaxbn_linen.BatchNorm)
  tx = optimizers.create_optimizer(config, steps_per_epoch)
  mesh = distributed.create_mesh(1)
  replicated = NamedSharding(mesh, P())
  state = jax.jit(functools.partial(train_state.create_train_state, model, tx,
                                    input_shape=(28, 28, 1)),
                  out_shardings=replicated)(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = input_pipeline.Batch(rng.integers(0, 256, (batch_size, 28, 28, 1), np.uint8),
                               rng.integers(0, 10, batch_size).astype(np.int32),
                               np.ones(batch_size, bool))
  batch = input_pipeline.to_global(batch, NamedSharding(mesh, P("data")), batch_size)
  step = steps.make_train_step(config, mesh, model, tx).lower(state, batch).compile()
  return step, state, batch


def run(batch_size: int = 128, steps: int = 20, repeats: int = 9, warmup: int = 3) -> dict:
  """Times the variants; returns medians of wall and CPU seconds per step and more.

  CPU time (of this process, all threads) is reported next to wall time: on a
  machine shared with other jobs it is the steadier of the two.
  """
  compiled = {}
  for name, norm in IMPLEMENTATIONS.items():
    step, state, batch = _compiled_step(norm, batch_size, steps_per_epoch=390)
    for _ in range(warmup):
      state = step(state, batch)
    jax.block_until_ready(state)
    compiled[name] = [step, state, batch]
  wall = {name: [] for name in IMPLEMENTATIONS}
  cpu = {name: [] for name in IMPLEMENTATIONS}
  for _ in range(repeats):
    for name, entry in compiled.items():
      step, state, batch = entry
      wall_start, cpu_start = time.perf_counter(), time.process_time()
      for _ in range(steps):
        state = step(state, batch)
      jax.block_until_ready(state)
      wall[name].append((time.perf_counter() - wall_start) / steps)
      cpu[name].append((time.process_time() - cpu_start) / steps)
      entry[1] = state
  wall = {name: statistics.median(times) for name, times in wall.items()}
  cpu = {name: statistics.median(times) for name, times in cpu.items()}
  # Every variant took the same steps from the same initial weights.
  sums = {name: jax.device_get(entry[1].epoch_sums) for name, entry in compiled.items()}
  return {
      "batch_size": batch_size, "steps": steps, "repeats": repeats,
      "seconds_per_step": wall, "cpu_seconds_per_step": cpu,
      "examples_per_sec": {name: batch_size / s for name, s in wall.items()},
      "speedup_jaxbn_vs_flax": wall["flax.linen"] / wall["jaxbn"],
      "cpu_speedup_jaxbn_vs_flax": cpu["flax.linen"] / cpu["jaxbn"],
      # CPU time above the no-BN floor: what the three BN layers (forward,
      # backward, running-statistics update) cost per step.
      "bn_cpu_seconds_per_step": {name: cpu[name] - cpu["no BN"]
                                  for name in ("jaxbn", "flax.linen")},
      "mean_train_loss": {name: float(s.loss) / int(s.steps) for name, s in sums.items()},
      "train_steps": {name: int(s.steps) for name, s in sums.items()},
  }


def format_table(result: dict) -> str:
  lines = [f"MNIST CNN training step, batch {result['batch_size']}, "
           f"{jax.device_count()} device(s) ({jax.devices()[0].platform}), median of "
           f"{result['repeats']} interleaved repeats x {result['steps']} steps",
           f"{'batch norm':<14}{'ms/step':>10}{'examples/s':>14}{'CPU ms/step':>14}"]
  for name, seconds in result["seconds_per_step"].items():
    lines.append(f"{name:<14}{seconds * 1e3:>10.2f}"
                 f"{result['examples_per_sec'][name]:>14,.0f}"
                 f"{result['cpu_seconds_per_step'][name] * 1e3:>14.2f}")
  bn = result["bn_cpu_seconds_per_step"]
  lines.append(f"jaxbn vs flax.linen, whole step: {result['speedup_jaxbn_vs_flax']:.2f}x "
               f"examples/s, {result['cpu_speedup_jaxbn_vs_flax']:.2f}x CPU time")
  lines.append(f"BN layers' CPU time above the no-BN floor: jaxbn "
               f"{bn['jaxbn'] * 1e3:.2f} ms, flax.linen {bn['flax.linen'] * 1e3:.2f} ms "
               "per step")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20, help="steps per timing")
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--tiny", action="store_true",
                      help="batch 16, 2 steps, 2 repeats: checks that it runs")
  parser.add_argument("--json", action="store_true", help="print JSON instead")
  args = parser.parse_args(argv)
  if args.tiny:
    result = run(batch_size=16, steps=2, repeats=2, warmup=1)
  else:
    result = run(batch_size=args.batch_size, steps=args.steps, repeats=args.repeats)
  print(json.dumps(result, indent=2) if args.json else format_table(result))
  return result


if __name__ == "__main__":
  main()
