"""Every experiment script runs end to end in --quick mode and writes JSON + PNG.

Quick mode trains a few steps on a few hundred MNIST images with one seed; the
numbers are meaningless, the plumbing (data, training, evaluation, JSON, plots,
the report) is what is tested. Experiments run in-process to share one JAX.
"""

import importlib
import json

import pytest

# name -> extra flags that keep the smoke run small
EXPERIMENTS = {
    "param_table": [],
    "feature_scaling": [],
    "scale_invariance": [],
    "bn_vs_nobn": [],
    "lr_sweep": ["--model", "mlp", "--optimizers", "adam"],
    "bn_paper_mlp": [],
    "inference_stats": [],
}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_quick(name, tmp_path):
  module = importlib.import_module(f"experiments.{name}")
  module.main(["--workdir", str(tmp_path), "--quick", *EXPERIMENTS[name]])
  output = name + ("_mlp" if name == "lr_sweep" else "")
  with open(tmp_path / f"{output}.json") as f:
    record = json.load(f)
  assert record["experiment"] == name
  assert record["quick"] is True
  assert record["command"].startswith(f"python -m experiments.{name} ")
  assert record["results"]
  if name != "param_table":  # the table is text, not a plot
    assert (tmp_path / f"{output}.png").stat().st_size > 1000
  if name == "param_table":
    assert record["results"]["matches_seed"] == {"totals": True, "rows": True}
  if name == "feature_scaling":
    summary = record["results"]["summary"]
    assert summary["standardized"]["condition_number"]["mean"] < 1.5
    assert summary["dollars_inches"]["condition_number"]["mean"] > 5e4


def test_report_lists_sections_commands_and_quick_warning(tmp_path):
  for name in ("param_table", "feature_scaling"):
    importlib.import_module(f"experiments.{name}").main(
        ["--workdir", str(tmp_path), "--quick"])
  from experiments import report
  output = tmp_path / "docs" / "results.md"
  report.main(["--workdir", str(tmp_path), "--output", str(output)])
  text = output.read_text()
  assert "## Summary" in text
  assert "Parameter table 38,910 / 38,650 / 260" in text
  assert "`python -m experiments.feature_scaling --workdir" in text
  assert "smoke-test (--quick) numbers" in text
  assert "Not run (no JSON found): bn_vs_nobn" in text
  assert (tmp_path / "docs" / "figures" / "feature_scaling.png").exists()
