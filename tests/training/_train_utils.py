"""Shared helpers of the train.py tests (tiny configs, subprocesses)."""

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
TRAIN_PY = REPO / "train.py"
TINY_CONFIG = REPO / "configs" / "tiny.py"

# Metrics that must not depend on topology or interruptions (timing excluded).
COMPARED_METRICS = ("epoch", "step", "train_loss", "train_accuracy", "val_loss",
                    "val_accuracy", "test_loss", "test_accuracy", "nonfinite_steps")


def tiny_config(**overrides):
  """configs/tiny.py with `overrides`."""
  from configs import tiny
  config = tiny.get_config()
  for key, value in overrides.items():
    config[key] = value
  return config


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def compared(records: list[dict]) -> list[dict]:
  """The topology-independent metrics (test_* only in the epochs that have them)."""
  return [{key: record[key] for key in COMPARED_METRICS if key in record}
          for record in records]


def assert_same_curve(records: list[dict], reference: list[dict]) -> None:
  """Equal metrics up to float rounding of a different reduction order.

  Different topologies sum in different orders: the first epoch agrees to
  ~1e-7, and 16 Adam steps at a constant learning rate amplify that to ~1e-4
  (training is chaotic). Accuracies may differ by at most one example.
  """
  assert len(records) == len(reference)
  for record, expected in zip(compared(records), compared(reference)):
    assert record.keys() == expected.keys()
    for key, value in expected.items():
      if key.endswith("accuracy"):
        np.testing.assert_allclose(record[key], value, rtol=0, atol=1 / 128 + 1e-9,
                                   err_msg=key)
      else:
        np.testing.assert_allclose(record[key], value, rtol=3e-4, atol=1e-6,
                                   err_msg=key)


def free_port() -> int:
  with contextlib.closing(socket.socket()) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def subprocess_env(num_devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def train_command(workdir, *flags) -> list[str]:
  return [sys.executable, str(TRAIN_PY), f"--config={TINY_CONFIG}",
          f"--workdir={workdir}", *flags]


def start_train(workdir, *flags, num_devices: int = 1, log_path=None) -> subprocess.Popen:
  """Starts train.py with the tiny config in a subprocess."""
  log = open(log_path, "w") if log_path else subprocess.DEVNULL
  return subprocess.Popen(train_command(workdir, *flags), cwd=REPO,
                          env=subprocess_env(num_devices), stdout=log,
                          stderr=subprocess.STDOUT)
