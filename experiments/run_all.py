"""Runs every experiment behind docs/results.md, then writes the report.

  python -m experiments.run_all --workdir runs/experiments [--quick]

Each experiment runs in this process with the flags listed in `RUNS` (the
same as running `python -m experiments.NAME --workdir DIR FLAGS` yourself,
which is the command each JSON file records), then
`python -m experiments.report --workdir DIR` writes docs/results.md. On the
project's 2-core CPU the whole set took 50 minutes at commit f1f09d6 and 82
minutes at commit 239576b (the run behind the current page; 8 of its minutes
shared the CPU with a test file). The code is not
what differs: on the day of the second run, f1f09d6's code took 84 s and
239576b's 59 s for `python -m experiments.bn_vs_nobn --epochs 1 --optimizers sgd`.
"""

from __future__ import annotations

import argparse
import importlib
import time

# (experiment, extra flags), cheapest first.
RUNS = (
    ("param_table", []),
    ("feature_scaling", []),
    ("scale_invariance", []),
    ("inference_stats", []),
    ("bn_paper_mlp", []),
    ("lr_sweep", ["--model", "mlp", "--batch_size", "60", "--epochs", "5"]),
    ("lr_sweep", ["--model", "cnn"]),
    ("bn_vs_nobn", []),
    ("bn_vs_nobn", ["--raw_pixels", "--tag", "raw_pixels"]),
)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m experiments.run_all",
                                   description=__doc__)
  parser.add_argument("--workdir", required=True,
                      help="directory for the experiments' JSON and PNG files")
  parser.add_argument("--quick", action="store_true",
                      help="every experiment in its --quick smoke-test mode")
  parser.add_argument("--output", default="docs/results.md",
                      help="where the report is written")
  parser.add_argument("--only", nargs="+", default=None,
                      help="run only these experiments (names from RUNS)")
  args = parser.parse_args(argv)
  for name, flags in RUNS:
    if args.only and name not in args.only:
      continue
    start = time.time()
    module = importlib.import_module(f"experiments.{name}")
    module.main(["--workdir", args.workdir, *(["--quick"] if args.quick else []), *flags])
    print(f"== {name} {' '.join(flags)}: {time.time() - start:.0f} s", flush=True)
  importlib.import_module("experiments.report").main(
      ["--workdir", args.workdir, "--output", args.output])


if __name__ == "__main__":
  main()
