"""The MNIST CNN trained end to end by train.py, PyTorch and Keras 3, side by side.

Every peer trains the same network (`training.models.MnistCNN`: Conv 10@5x5 ->
BN -> ReLU -> MaxPool -> Conv 20@5x5 -> BN -> ReLU -> MaxPool -> Dense 100 ->
BN -> ReLU -> Dense 10; 38,910 numbers, Keras' BN momentum 0.99 and epsilon
1e-3, Glorot-uniform kernels, zero biases) on the same data (MNIST
train[:50000], validation train[50000:], test; pixels in [0, 1]) with the same
hyperparameters as `configs/mnist_bn.py` (Adam, one-cycle learning rate
peaking at 0.01 after 0.3 epochs, 3 epochs, full batches only), and
evaluates validation and test after every epoch (train.py with
`--config.evaluate_test_every_epoch=True`; by default it evaluates test once, at the end), in
batches of `EVAL_BATCH_SIZE` (train.py's default `eval_batch_size`):

* `train.py`: `python train.py --config.batch_size=B` in a fresh workdir (its
  own loop, checkpoints and outputs included), run twice back to back with a
  fresh JAX compilation cache: "train.py (first run)" compiles its steps,
  "train.py" is every later run of the same config (train.py keeps JAX's
  persistent compilation cache, by default in ~/.cache/jaxbn).
* `torch NCHW` / `torch channels_last`: PyTorch eager on CPU as a PyTorch
  user writes it: the splits converted once to float tensors, each step
  indexes a batch out of them, `torch.optim.Adam`, the one-cycle schedule as
  a `LambdaLR`, the same per-epoch example order; PyTorch's defaults
  otherwise (its thread count, OpenMP's wait policy unset).
* `torch NCHW (OMP passive)`: the same with `OMP_WAIT_POLICY=PASSIVE`, which
  the other benchmarks set for PyTorch (`benchmarks._harness`): OpenMP's
  threads sleep at once after each parallel region instead of spinning
  first. Slower on an idle machine, much faster on one with more runnable
  threads than cores.
* `keras (tensorflow)` / `keras (jax)`: Keras 3 `model.fit` with the backend
  chosen by `KERAS_BACKEND` (Keras shuffles by itself; its last, partial
  batch of an epoch is trained too).

Each run is its own subprocess (start-up included in its wall time). Runs
are interleaved: round `r` runs every (peer, batch size) once, starting at a
rotating offset, so load from other jobs spreads over all of them. Reported
per peer and batch size, medians (and min-max) over rounds:

* training images/s: the training images of epochs 2..E over their training
  time (steady state; epoch 1 holds compilation and warm-up; with one epoch,
  the steps after the first `WARMUP_STEPS`);
* wall time: from launching the subprocess to its exit, for the whole run
  (imports, data loading, compilation, training, evaluation, train.py's
  checkpoints);
* test accuracy after the last epoch.

The verdict for train.py is computed from the medians: "faster" when its
images/s / PyTorch's best (of its three rows) >= 1.0 and its wall time
/ PyTorch's best wall time <= 1.0. The same two ratios are also computed
within each round (train.py against the best PyTorch row of that round) and
reported as median and min-max: the spread that the machine's load leaves.

  python -m benchmarks.peers                      # batch 32 and 128, 3 rounds
  python -m benchmarks.peers --rounds 1 --peers train.py,torch
  python -m benchmarks.peers --tiny               # a few steps (smoke test)
  # One PyTorch run with torch.profiler over 50 steps (the table on stderr):
  python -m benchmarks.peers --worker 'torch NCHW' --profile_steps 50 --epochs 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from benchmarks import _harness  # noqa: E402  (sets OMP_WAIT_POLICY first)
from configs import mnist_bn  # noqa: E402

FIRST_RUN = "train.py (first run)"
TORCH_PASSIVE = "torch NCHW (OMP passive)"
PEERS = ("train.py", "torch NCHW", "torch channels_last", TORCH_PASSIVE,
         "keras (tensorflow)", "keras (jax)")
# OpenMP wait policy of each PyTorch peer's process; '' = unset, PyTorch's default.
TORCH_OMP_WAIT_POLICY = {"torch NCHW": "", "torch channels_last": "",
                         TORCH_PASSIVE: "PASSIVE"}
WARMUP_STEPS = 5
# Every peer trains with train.py's default recipe (configs/mnist_bn.py).
_RECIPE = mnist_bn.get_config()
LEARNING_RATE = _RECIPE.learning_rate
WARMUP_EPOCHS = _RECIPE.warmup_epochs  # the one-cycle rise, in epochs
BN_MOMENTUM = _RECIPE.bn_momentum  # Keras convention (PyTorch: 1 - momentum)
BN_EPSILON = _RECIPE.bn_epsilon
EVAL_BATCH_SIZE = _RECIPE.eval_batch_size
RESULT_PREFIX = "PEER_RESULT "


# --- data -------------------------------------------------------------------

def load_mnist(num_train: int = 0, num_eval: int = 0):
  """(train, validation, test) `Split`s as train.py reads them (uint8 NHWC)."""
  from configs import mnist_bn
  from training import datasets
  from training import run_config
  config = mnist_bn.get_config()
  names = run_config.split_names(config)
  splits, _ = datasets.load_dataset(config.dataset, names)
  counts = (num_train, num_eval, num_eval)
  return tuple(splits[name].take(n) for name, n in zip(names, counts))


def warmup_steps(steps_per_epoch: int) -> int:
  """Steps of the one-cycle rise, as `optimizers.create_learning_rate_schedule`."""
  return max(int(WARMUP_EPOCHS * steps_per_epoch), 1)


def onecycle_learning_rate(step: int, total_steps: int, warmup: int) -> float:
  """`optax.cosine_onecycle_schedule`'s value (train.py's schedule) at `step`."""
  peak, div, final_div = LEARNING_RATE, 25.0, 1e4
  if step < warmup:
    fraction = step / warmup
    start, end = peak / div, peak
  else:
    fraction = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    start, end = peak, peak / div / final_div
  return end + (start - end) * (1 + math.cos(math.pi * fraction)) / 2


# --- workers (each runs in its own subprocess) -------------------------------

def _worker_train_py(args) -> dict:
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="peers-train-py-"))
  command = [sys.executable, str(REPO / "train.py"), f"--workdir={workdir}",
             f"--config.batch_size={args.batch_size}",
             f"--config.num_epochs={args.epochs}",
             # The other peers evaluate the test split every epoch; so does this one.
             "--config.evaluate_test_every_epoch=True"]
  if args.num_train:
    command += [f"--config.num_train_examples={args.num_train}",
                f"--config.num_eval_examples={args.num_eval}",
                f"--config.eval_batch_size={min(EVAL_BATCH_SIZE, args.num_eval)}"]
  try:
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in
               (workdir / "metrics.jsonl").read_text().splitlines()]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  steady = records[1:] or records
  steps_per_epoch = records[0]["step"]
  images = steps_per_epoch * args.batch_size * len(steady)
  seconds = sum(steps_per_epoch * args.batch_size / r["examples_per_sec"]
                for r in steady)
  return {"images_per_sec": images / seconds,
          "test_accuracy": records[-1]["test_accuracy"]}


def _worker_torch(args, channels_last: bool) -> dict:
  import torch
  from torch import nn
  from training import input_pipeline
  torch.manual_seed(0)
  train, validation, test = load_mnist(args.num_train, args.num_eval)
  momentum = 1 - BN_MOMENTUM
  model = nn.Sequential(
      nn.Conv2d(1, 10, 5), nn.BatchNorm2d(10, eps=BN_EPSILON, momentum=momentum),
      nn.ReLU(), nn.MaxPool2d(2),
      nn.Conv2d(10, 20, 5), nn.BatchNorm2d(20, eps=BN_EPSILON, momentum=momentum),
      nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
      nn.Linear(320, 100), nn.BatchNorm1d(100, eps=BN_EPSILON, momentum=momentum),
      nn.ReLU(), nn.Linear(100, 10))
  for module in model:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
      nn.init.xavier_uniform_(module.weight)  # Keras' glorot_uniform
      nn.init.zeros_(module.bias)
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=memory_format)

  def to_tensors(split):  # once per split: uint8 NHWC -> float NCHW in [0, 1]
    images = torch.from_numpy(split.images).permute(0, 3, 1, 2).float().div_(255)
    return (images.contiguous(memory_format=memory_format),
            torch.from_numpy(split.labels).long())

  (x_train, y_train), (x_val, y_val), (x_test, y_test) = map(
      to_tensors, (train, validation, test))
  steps_per_epoch = len(y_train) // args.batch_size
  total_steps = steps_per_epoch * args.epochs
  optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
  warmup = warmup_steps(steps_per_epoch)
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer,
      lambda step: onecycle_learning_rate(step, total_steps, warmup) / LEARNING_RATE)
  loss_fn = nn.CrossEntropyLoss()
  test_accuracy, steady_images, steady_seconds = float("nan"), 0, 0.0

  def evaluate(images, labels):
    model.eval()
    correct = 0
    with torch.no_grad():
      for start in range(0, len(labels), EVAL_BATCH_SIZE):
        logits = model(images[start:start + EVAL_BATCH_SIZE])
        correct += int((logits.argmax(1) == labels[start:start + EVAL_BATCH_SIZE]).sum())
    model.train()
    return correct / len(labels)

  profiler = None
  if args.profile_steps:
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
  for epoch in range(args.epochs):
    order = torch.from_numpy(
        input_pipeline.epoch_permutation(len(y_train), seed=0, epoch=epoch))
    start = time.perf_counter()
    for step in range(steps_per_epoch):
      if epoch == 0 and step == WARMUP_STEPS:
        start = time.perf_counter()
      if profiler and epoch == 0 and step in (WARMUP_STEPS, WARMUP_STEPS + args.profile_steps):
        (profiler.start if step == WARMUP_STEPS else profiler.stop)()
      indices = order[step * args.batch_size:(step + 1) * args.batch_size]
      x, y = x_train[indices], y_train[indices]
      optimizer.zero_grad(set_to_none=True)
      loss = loss_fn(model(x), y)
      loss.backward()
      optimizer.step()
      scheduler.step()
    seconds = time.perf_counter() - start
    if epoch > 0 or args.epochs == 1:
      steps = steps_per_epoch - (WARMUP_STEPS if epoch == 0 else 0)
      steady_images += steps * args.batch_size
      steady_seconds += seconds
    evaluate(x_val, y_val)
    test_accuracy = evaluate(x_test, y_test)
  if profiler:
    print(f"torch.profiler, steps {WARMUP_STEPS}-{WARMUP_STEPS + args.profile_steps - 1} "
          "of epoch 1:\n" + profiler.key_averages().table(sort_by="self_cpu_time_total",
                                                        row_limit=20), file=sys.stderr)
  return {"images_per_sec": steady_images / steady_seconds,
          "test_accuracy": test_accuracy, "threads": torch.get_num_threads(),
          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def _worker_keras(args) -> dict:
  import keras
  from keras import layers
  keras.utils.set_random_seed(0)
  train, validation, test = load_mnist(args.num_train, args.num_eval)

  def to_float(images):
    return images.astype(np.float32) / np.float32(255)

  x_train, x_val, x_test = (to_float(s.images) for s in (train, validation, test))
  steps_per_epoch = math.ceil(len(train.labels) / args.batch_size)
  total_steps = steps_per_epoch * args.epochs

  class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """train.py's optax.cosine_onecycle_schedule in keras.ops."""

    def __call__(self, step):
      ops = keras.ops
      step = ops.cast(step, "float32")
      peak, initial = LEARNING_RATE, LEARNING_RATE / 25.0
      final = initial / 1e4
      warmup = float(warmup_steps(steps_per_epoch))
      rise = ops.minimum(step / warmup, 1.0)
      fall = ops.clip((step - warmup) / max(total_steps - warmup, 1.0), 0.0, 1.0)
      rising = peak + (initial - peak) * (1 + ops.cos(math.pi * rise)) / 2
      falling = final + (peak - final) * (1 + ops.cos(math.pi * fall)) / 2
      return ops.where(step < warmup, rising, falling)

  def bn():
    return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON)

  model = keras.Sequential([
      keras.Input((28, 28, 1)),
      layers.Conv2D(10, 5), bn(), layers.Activation("relu"), layers.MaxPooling2D(2),
      layers.Conv2D(20, 5), bn(), layers.Activation("relu"), layers.MaxPooling2D(2),
      layers.Flatten(), layers.Dense(100), bn(), layers.Activation("relu"),
      layers.Dense(10)])
  if model.count_params() != 38910:
    raise AssertionError(f"Keras model has {model.count_params()} numbers, not 38,910")
  model.compile(optimizer=keras.optimizers.Adam(OneCycle()),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  times = {}

  class Clock(keras.callbacks.Callback):
    """Training time per epoch: first to last batch, validation excluded."""

    def on_epoch_begin(self, epoch, logs=None):
      times[epoch] = [time.perf_counter(), None, 0]

    def on_train_batch_end(self, batch, logs=None):
      epoch = max(times)
      if epoch == 0 and batch + 1 == WARMUP_STEPS:
        times[epoch][0] = time.perf_counter()
      times[epoch][1] = time.perf_counter()
      times[epoch][2] = batch + 1

  test_accuracy = []

  class TestEvaluation(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
      test_accuracy.append(self.model.evaluate(x_test, test.labels, batch_size=EVAL_BATCH_SIZE,
                                               verbose=0)[1])

  model.fit(x_train, train.labels, batch_size=args.batch_size, epochs=args.epochs,
            validation_data=(x_val, validation.labels), validation_batch_size=EVAL_BATCH_SIZE,
            shuffle=True, verbose=0, callbacks=[Clock(), TestEvaluation()])
  steady = [e for e in times if e > 0] or [0]
  images = seconds = 0
  for epoch in steady:
    begin, end, batches = times[epoch]
    examples = len(train.labels) if epoch > 0 else (
        len(train.labels) - WARMUP_STEPS * args.batch_size)
    images += examples if batches == steps_per_epoch else batches * args.batch_size
    seconds += end - begin
  return {"images_per_sec": images / seconds, "test_accuracy": float(test_accuracy[-1])}


def _run_worker(args) -> None:
  name = args.worker
  if name == "train.py":
    result = _worker_train_py(args)
  elif name.startswith("torch"):
    # Read by PyTorch's OpenMP runtime when torch is first imported (below).
    policy = TORCH_OMP_WAIT_POLICY[name]
    if policy:
      os.environ["OMP_WAIT_POLICY"] = policy
    else:
      os.environ.pop("OMP_WAIT_POLICY", None)
    result = _worker_torch(args, channels_last=name == "torch channels_last")
  else:
    result = _worker_keras(args)
  print(RESULT_PREFIX + json.dumps(result), flush=True)


# --- the driver ---------------------------------------------------------------

def available_peers(requested) -> tuple[list[str], dict[str, str]]:
  """The requested peers whose framework is installed, and why others are not."""
  missing = {}
  present = []
  for name in requested:
    module = "torch" if name in TORCH_OMP_WAIT_POLICY else {
        "train.py": "jax", "keras (tensorflow)": "tensorflow", "keras (jax)": "jax"}[name]
    if name.startswith("keras") and importlib.util.find_spec("keras") is None:
      missing[name] = "keras is not installed"
    elif importlib.util.find_spec(module) is None:
      missing[name] = f"{module} is not installed"
    else:
      present.append(name)
  return present, missing


def run_peer(name: str, batch_size: int, epochs: int, num_train: int, num_eval: int,
             timeout: float, extra_env: dict | None = None) -> dict:
  """Runs one peer in a subprocess; returns its result, wall time or error."""
  env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TF_CPP_MIN_LOG_LEVEL="2",
             **(extra_env or {}))
  if name.startswith("keras"):
    env["KERAS_BACKEND"] = "jax" if name == "keras (jax)" else "tensorflow"
  command = [sys.executable, "-m", "benchmarks.peers", "--worker", name,
             "--batch_size", str(batch_size), "--epochs", str(epochs),
             "--num_train", str(num_train), "--num_eval", str(num_eval)]
  start = time.perf_counter()
  try:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  wall = time.perf_counter() - start
  lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
  if done.returncode or not lines:
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {done.returncode}: {tail[:200]}"}
  return dict(json.loads(lines[-1][len(RESULT_PREFIX):]), wall_seconds=wall)


def _median(values):
  return float(np.median(values)) if values else float("nan")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_sizes", default="32,128")
  parser.add_argument("--peers", default=",".join(PEERS),
                      help=f"comma-separated subset of {', '.join(PEERS)}")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--num_train", type=int, default=0, help="0 = all 50,000")
  parser.add_argument("--num_eval", type=int, default=0, help="0 = all 10,000")
  parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
  parser.add_argument("--tiny", action="store_true",
                      help="1 epoch of 1,280 examples, 1 round: checks that it runs")
  parser.add_argument("--json", help="also write the results to this file")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--batch_size", type=int, default=128, help=argparse.SUPPRESS)
  parser.add_argument("--profile_steps", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    _run_worker(args)
    return {}
  if args.tiny:
    args.epochs, args.num_train, args.num_eval, args.rounds = 1, 1280, 200, 1
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  peers, missing = available_peers([p.strip() for p in args.peers.split(",")])
  load_mnist()  # prepares the dataset cache once, outside every timed run
  cases = [(peer, batch) for batch in batch_sizes for peer in peers]
  samples = {case: [] for case in cases}
  if "train.py" in peers:
    samples.update({(FIRST_RUN, batch): [] for batch in batch_sizes})
  load_start = os.getloadavg()
  for round_index in range(args.rounds):
    offset = round_index % len(cases)
    for case in cases[offset:] + cases[:offset]:
      runs = [case]
      extra_env = None
      if case[0] == "train.py":
        runs = [(FIRST_RUN, case[1]), case]
        cache = tempfile.mkdtemp(prefix="peers-jax-cache-")
        extra_env = {"JAX_COMPILATION_CACHE_DIR": cache}
      for run in runs:
        result = run_peer(case[0], case[1], args.epochs, args.num_train, args.num_eval,
                          args.timeout, extra_env)
        samples[run].append(result)
        print(f"round {round_index + 1}/{args.rounds} {run[0]} batch {run[1]}: {result}",
              file=sys.stderr, flush=True)
      if extra_env:
        shutil.rmtree(extra_env["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  load_end = os.getloadavg()
  if "train.py" in peers:
    peers = [FIRST_RUN] + peers
  summary = summarize(samples, batch_sizes, peers)
  print(format_report(summary, batch_sizes, peers, missing, args, load_start, load_end))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {"summary": {f"{p}@{b}": v for (p, b), v in summary.items()},
         "samples": {f"{p}@{b}": v for (p, b), v in samples.items()}}, indent=2))
  return summary


def _range(values) -> list[float]:
  return [float(min(values)), float(max(values))] if values else [math.nan, math.nan]


def summarize(samples, batch_sizes, peers) -> dict:
  """Per (peer, batch): medians and ranges over rounds; train.py's ratios to PyTorch.

  Returns:
    `{(peer, batch): entry}`; every entry has `images_per_sec`,
    `images_per_sec_range`, `wall_seconds`, `wall_seconds_range`,
    `test_accuracy`, `runs`, `errors`. train.py's entries also have, when a
    PyTorch row ran: `vs_torch_images_per_sec` and `vs_torch_wall` (ratios
    of the medians to the best PyTorch row's medians) and
    `round_vs_torch_images_per_sec` / `round_vs_torch_wall` (the ratios of
    each round where all of them ran, to that round's best PyTorch row).
  """
  summary = {}
  for (peer, batch), runs in samples.items():
    good = [r for r in runs if "error" not in r]
    errors = [r["error"] for r in runs if "error" in r]
    summary[(peer, batch)] = {
        "images_per_sec": _median([r["images_per_sec"] for r in good]),
        "images_per_sec_range": _range([r["images_per_sec"] for r in good]),
        "wall_seconds": _median([r["wall_seconds"] for r in good]),
        "wall_seconds_range": _range([r["wall_seconds"] for r in good]),
        "test_accuracy": _median([r["test_accuracy"] for r in good]),
        "runs": len(good), "errors": errors}
  for batch, ours_name in [(b, n) for b in batch_sizes for n in (FIRST_RUN, "train.py")]:
    if ours_name not in peers:
      continue
    torch_names = [p for p in TORCH_OMP_WAIT_POLICY if p in peers]
    torch_cases = [summary[(p, batch)] for p in torch_names if summary[(p, batch)]["runs"]]
    ours = summary[(ours_name, batch)]
    if torch_cases and ours["runs"]:
      best_rate = max(c["images_per_sec"] for c in torch_cases) or float("nan")
      best_wall = min(c["wall_seconds"] for c in torch_cases)
      ours["vs_torch_images_per_sec"] = ours["images_per_sec"] / best_rate
      ours["vs_torch_wall"] = ours["wall_seconds"] / best_wall
      rate_ratios, wall_ratios = [], []
      for round_runs in zip(samples[(ours_name, batch)],
                            *(samples[(p, batch)] for p in torch_names)):
        if any("error" in r for r in round_runs):
          continue
        mine, others = round_runs[0], round_runs[1:]
        rate_ratios.append(mine["images_per_sec"] / max(r["images_per_sec"] for r in others))
        wall_ratios.append(mine["wall_seconds"] / min(r["wall_seconds"] for r in others))
      ours["round_vs_torch_images_per_sec"] = rate_ratios
      ours["round_vs_torch_wall"] = wall_ratios
  return summary


def _spread(ratios) -> str:
  """`median (min-max)` of per-round ratios."""
  return f"{np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def format_report(summary, batch_sizes, peers, missing, args, load_start, load_end
                  ) -> str:
  import platform
  lines = ["### MNIST CNN end to end: train.py vs PyTorch and Keras 3", "",
           f"`{_harness.command_line()}`", "",
           f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
           f"{load_start[0]:.1f} / {load_start[1]:.1f} (1 / 5 min) at start, "
           f"{load_end[0]:.1f} / {load_end[1]:.1f} at the end; {args.rounds} "
           f"interleaved round(s) of {args.epochs} epoch(s)"
           + (f" on {args.num_train} training examples" if args.num_train else "")
           + "; medians (min-max) over rounds. images/s: "
           + (f"training images of epochs 2-{args.epochs} over their training time"
              if args.epochs > 1 else
              f"training images after {WARMUP_STEPS} warm-up steps over their time")
           + "; wall: the whole run in a fresh process.", ""]
  rows = []
  for batch in batch_sizes:
    for peer in peers:
      entry = summary[(peer, batch)]
      if not entry["runs"]:
        rows.append([str(batch), peer, "-", "-", "-", "-", "; ".join(entry["errors"])])
        continue
      ratio = "-"
      if "vs_torch_images_per_sec" in entry:
        ratio = (f"{entry['vs_torch_images_per_sec']:.2f}x images/s, "
                 f"{entry['vs_torch_wall']:.2f}x wall")
        if len(entry["round_vs_torch_images_per_sec"]) > 1:
          ratio += (f"; per round {_spread(entry['round_vs_torch_images_per_sec'])}x, "
                    f"{_spread(entry['round_vs_torch_wall'])}x")
      low, high = entry["images_per_sec_range"]
      low_wall, high_wall = entry["wall_seconds_range"]
      rows.append([str(batch), peer,
                   f"{entry['images_per_sec']:,.0f}" + (
                       f" ({low:,.0f}-{high:,.0f})" if entry["runs"] > 1 else ""),
                   f"{entry['wall_seconds']:.1f}" + (
                       f" ({low_wall:.1f}-{high_wall:.1f})" if entry["runs"] > 1 else ""),
                   f"{100 * entry['test_accuracy']:.2f}%",
                   ratio, f"{entry['runs']} run(s)"
                   + (f"; {len(entry['errors'])} failed" if entry["errors"] else "")])
  lines.append(_harness.markdown_table(
      ["batch", "peer", "train images/s", "wall s (whole run)", "test acc",
       "train.py vs best torch", "runs"], rows))
  for name, why in missing.items():
    lines.append(f"\n{name}: not run ({why}).")
  verdicts = []
  for batch, name in [(b, n) for b in batch_sizes for n in ("train.py", FIRST_RUN)]:
    entry = summary.get((name, batch), {})
    if "vs_torch_images_per_sec" in entry:
      met = entry["vs_torch_images_per_sec"] >= 1.0 and entry["vs_torch_wall"] <= 1.0
      verdicts.append(
          f"{name}, batch {batch}: {'met' if met else 'missed'} (images/s "
          f"{entry['vs_torch_images_per_sec']:.2f}x, wall {entry['vs_torch_wall']:.2f}x "
          "the best PyTorch layout)")
  if verdicts:
    lines += ["", "Target (train.py images/s >= 1.0x and wall time <= 1.0x PyTorch's "
              "best layout, from the medians above): " + "; ".join(verdicts) + "."]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
