"""Shared helpers for the experiment scripts: flags, seeds, JSON and plots.

Every experiment is `python -m experiments.NAME --workdir DIR [--quick]` and
writes `DIR/NAME.json` (its numbers, the exact command and the environment)
and `DIR/NAME*.png`; `python -m experiments.report` turns the JSON files into
docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import numpy as np

from training import files

# TensorFlow (tfds) must not spam logs. It leaves accelerators to JAX
# (training.prepare hides GPUs from TensorFlow only; an environment
# variable such as CUDA_VISIBLE_DEVICES would hide them from JAX as well).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_SEEDS = (0, 1, 2)


def parse_args(name: str, description: str, argv=None, extra=None) -> argparse.Namespace:
  """`--workdir`, `--quick`, `--seeds` (and experiment-specific flags via `extra`)."""
  parser = argparse.ArgumentParser(prog=f"python -m experiments.{name}",
                                   description=description)
  parser.add_argument("--workdir", required=True,
                      help="directory for the JSON results and PNG plots")
  parser.add_argument("--quick", action="store_true",
                      help="tiny smoke-test version (1 seed, few steps)")
  parser.add_argument("--seeds", type=int, nargs="+", default=None,
                      help=f"random seeds (default {list(DEFAULT_SEEDS)}, --quick: [0])")
  parser.add_argument("--tag", default="",
                      help="suffix of the output files (NAME_TAG.json), to keep variants")
  if extra is not None:
    extra(parser)
  args = parser.parse_args(argv)
  if args.seeds is None:
    args.seeds = [0] if args.quick else list(DEFAULT_SEEDS)
  os.makedirs(args.workdir, exist_ok=True)
  args.name = name
  args.suffix = f"_{args.tag}" if args.tag else ""
  flags = sys.argv[1:] if argv is None else list(argv)
  args.command = f"python -m experiments.{name} {shlex.join(flags)}"
  args.start_time = time.time()
  # The code that produces the numbers is the code at the start of the run.
  args.git_commit = _git_commit()
  return args


def run_experiment(name: str, description: str, run, plot=None, argv=None, *,
                   extra=None, suffix=lambda args: "") -> None:
  """The `main` of an experiment: parse flags, `run(args)`, write the JSON, plot.

  The figure is always drawn from the JSON file, so `--plot_only` (redraw it
  from an earlier run's JSON, e.g. after changing `plot`) draws the same
  figure as the run that wrote it, with that run's command under the title.

  Args:
    name: the experiment's module name (`python -m experiments.NAME`).
    description: its `__doc__`, shown by `--help`.
    run: `run(args) -> results`, a dict of JSON-able numbers and arrays.
    plot: `plot(args, results)` with the results as read back from the JSON;
      writes the PNG with `save_figure`. None: the experiment has no figure.
    argv: command-line arguments (default `sys.argv[1:]`).
    extra: `extra(parser)` adds the experiment's own flags.
    suffix: `suffix(args)`, appended to the file names (`NAME[_TAG]SUFFIX.json`).
  """
  def flags(parser):
    if plot is not None:
      parser.add_argument("--plot_only", action="store_true",
                          help="only redraw the figure from the JSON an earlier run wrote")
    if extra is not None:
      extra(parser)

  args = parse_args(name, description, argv, extra=flags)
  if getattr(args, "plot_only", False):
    path = json_path(args, suffix(args))
    if not os.path.exists(path):
      raise SystemExit(f"--plot_only: {path} does not exist; run the experiment first")
  else:
    path = write_json(args, run(args), suffix(args))
  if plot is not None:
    with open(path) as f:
      record = json.load(f)
    # The figure's subtitle and seed count are those of the run that wrote the JSON.
    args.command, args.seeds = record["command"], record["seeds"]
    plot(args, record["results"])


def _git_commit() -> str | None:
  """HEAD, with '+dirty' if experiments/, training/ or jaxbn/ had uncommitted edits."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True, cwd=here).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", here,
                            os.path.join(here, os.pardir, "training"),
                            os.path.join(here, os.pardir, "jaxbn")],
                           capture_output=True, text=True, check=True,
                           cwd=here).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ("+dirty" if dirty else "")


def _to_builtin(value):
  if isinstance(value, dict):
    return {str(k): _to_builtin(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_builtin(v) for v in value]
  if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
    return _to_builtin(np.asarray(value).tolist())
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return value if np.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def json_path(args: argparse.Namespace, suffix: str = "") -> str:
  """`workdir/NAME[_TAG][suffix].json`."""
  return os.path.join(args.workdir, f"{args.name}{args.suffix}{suffix}.json")


def write_json(args: argparse.Namespace, results: dict, suffix: str = "") -> str:
  """Writes `results` with provenance to `workdir/NAME[_TAG][suffix].json`."""
  import jax  # Imported late so that scripts can set JAX flags first.
  record = {
      "experiment": args.name,
      "command": args.command,
      "quick": args.quick,
      "seeds": list(args.seeds),
      "git_commit": args.git_commit,
      "jax_version": jax.__version__,
      "platform": f"{platform.platform()}, {os.cpu_count()} CPUs, {jax.default_backend()}",
      "wall_time_s": round(time.time() - args.start_time, 1),
      "results": _to_builtin(results),
  }
  path = json_path(args, suffix)
  # Atomic: the partial results that long experiments write after each run
  # replace the previous ones whole, even if the process is killed mid-write.
  text = json.dumps(record, indent=1).encode()
  files.atomic_write(path, lambda f: f.write(text))
  print(f"wrote {path} ({record['wall_time_s']} s)")
  return path


def figure(nrows: int = 1, ncols: int = 1, *, width: float = 5.0, height: float = 3.6):
  """A matplotlib figure on the non-interactive Agg backend."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                           squeeze=False)
  return fig, axes


def save_figure(args: argparse.Namespace, fig, suffix: str = "") -> str:
  import matplotlib.pyplot as plt
  path = os.path.join(args.workdir, f"{args.name}{args.suffix}{suffix}.png")
  fig.suptitle(f"{fig._suptitle.get_text() if fig._suptitle else ''}\n{args.command}",
               fontsize=7, y=0.995)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"wrote {path}")
  return path


def mean_std(values) -> dict:
  """`{"mean", "std", "min", "max", "n"}` over seeds (std with ddof=1; 0 for n=1)."""
  values = np.asarray(values, dtype=np.float64)
  finite = values[np.isfinite(values)]
  return {
      "mean": float(finite.mean()) if finite.size else None,
      "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
      "min": float(finite.min()) if finite.size else None,
      "max": float(finite.max()) if finite.size else None,
      "n": int(values.size),
      "n_finite": int(finite.size),
  }


def first_reaching(history, key: str, threshold: float):
  """Per instance, the first `(step, epoch)` whose `key` >= threshold (None if never)."""
  values = np.stack([np.asarray(h[key], float) for h in history])  # (evals, instances)
  out = []
  for i in range(values.shape[1]):
    hits = np.nonzero(np.nan_to_num(values[:, i], nan=-1.0) >= threshold)[0]
    out.append(None if not hits.size else
               {"step": history[hits[0]]["step"], "epoch": history[hits[0]]["epoch"]})
  return out
