"""Every experiment runs end to end in --quick mode; the report is built from them.

Quick mode trains a few steps on a few hundred MNIST images with one seed; the
numbers are meaningless, the plumbing (data, training, evaluation, JSON, plots,
the report) is what is tested. `experiments.run_all --quick` runs the whole
list once in this process (module fixture); the tests then check each output.
The report's arithmetic and its verdict rules are checked on hand-made numbers
in tests/experiments/test_verdicts.py.
"""

import importlib
import json
import re

import numpy as np
import pytest

from experiments import _mnist
from experiments import report
from experiments import run_all

OUTPUTS = {  # JSON stem -> experiment
    "param_table": "param_table",
    "feature_scaling": "feature_scaling",
    "scale_invariance": "scale_invariance",
    "inference_stats": "inference_stats",
    "bn_paper_mlp": "bn_paper_mlp",
    "lr_sweep_mlp": "lr_sweep",
    "lr_sweep_cnn": "lr_sweep",
    "bn_vs_nobn": "bn_vs_nobn",
    "bn_vs_nobn_raw_pixels": "bn_vs_nobn",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("experiments")
  output = workdir / "docs" / "results.md"
  run_all.main(["--workdir", str(workdir), "--quick", "--output", str(output)])
  return workdir, output.read_text()


def test_run_all_covers_every_experiment_script():
  scripts = {name for name, _ in run_all.RUNS}
  assert scripts == set(report.SECTIONS)
  assert set(OUTPUTS.values()) == scripts


@pytest.mark.parametrize("stem", sorted(OUTPUTS))
def test_experiment_quick_outputs(stem, quick_run):
  workdir, _ = quick_run
  with open(workdir / f"{stem}.json") as f:
    record = json.load(f)
  name = OUTPUTS[stem]
  assert record["experiment"] == name
  assert record["quick"] is True
  assert record["command"].startswith(f"python -m experiments.{name} --workdir ")
  assert record["results"]
  if name != "param_table":  # the table is text, not a plot
    assert (workdir / f"{stem}.png").stat().st_size > 1000
  results = record["results"]
  if name == "param_table":
    assert results["matches_seed"] == {"totals": True, "rows": True}
  if name == "feature_scaling":
    assert results["summary"]["standardized"]["condition_number"]["mean"] < 1.5
    assert results["summary"]["dollars_inches"]["condition_number"]["mean"] > 5e4
  if name == "bn_vs_nobn":
    assert results["pixel_scale"] == (1.0 if stem.endswith("raw_pixels") else 1 / 255)
    for run in results["runs"].values():
      # Evaluations at exact epoch fractions, the last one at the epoch's end.
      assert [h["step"] for h in run["history"]][-1] == run["steps_per_epoch"]
  if name == "inference_stats":
    curve = results["variants_over_training"]["momentum=0.99, biased var"]
    assert curve["steps"] == [5, 10]
    np.testing.assert_allclose(curve["weight_of_initial_state"], [0.99 ** 5, 0.99 ** 10])


def test_report_has_every_section_and_the_quick_warning(quick_run):
  _, text = quick_run
  for heading in ("## Summary", "## 1. BN vs no BN", "## 1b. BN vs no BN",
                  "## 2a. Learning-rate robustness: the MNIST CNN",
                  "## 2b. Learning-rate robustness: the BN paper",
                  "## 3. The BN paper", "## 4. Feature scaling", "## 5. Scale invariance",
                  "## 6. Inference", "## 7. The seed's parameter table"):
    assert heading in text
  assert "Parameter table 38,910 / 38,650 / 260" in text
  assert "`python -m experiments.feature_scaling --workdir" in text
  assert "smoke-test (--quick) numbers" in text
  assert "Not run" not in text
  # Every verdict names its outcome and the rule (with thresholds) that decided it.
  summary = text.split("## Summary")[1].split("\n## ")[0]
  rows = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line]
  assert len(rows) == 1 + 11  # the header and eleven claims
  for row in rows[1:]:
    assert re.search(r"\| \*\*[a-z ]+\*\*.*\(rule: .+\) \|$", row), row


def test_report_lists_missing_experiments(tmp_path):
  importlib.import_module("experiments.param_table").main(
      ["--workdir", str(tmp_path), "--quick"])
  output = tmp_path / "results.md"
  report.main(["--workdir", str(tmp_path), "--output", str(output)])
  assert "Not run (no JSON found): bn_vs_nobn" in output.read_text()


def test_evaluation_steps_hit_epoch_ends():
  assert _mnist.evaluation_steps(1562, 2, 4) == [390, 781, 1172, 1562, 1952, 2343,
                                                 2734, 3124]
  assert _mnist.evaluation_steps(100, 0.5, 4) == [25, 50]
  assert _mnist.evaluation_steps(100, 0.3, 4) == [25, 30]



def test_plot_only_redraws_the_figure_from_the_json(quick_run, tmp_path):
  workdir, _ = quick_run
  for name in ("feature_scaling", "lr_sweep_cnn"):
    (tmp_path / f"{name}.json").write_bytes((workdir / f"{name}.json").read_bytes())
  record = json.loads((tmp_path / "lr_sweep_cnn.json").read_text())
  importlib.import_module("experiments.feature_scaling").main(
      ["--workdir", str(tmp_path), "--plot_only"])
  importlib.import_module("experiments.lr_sweep").main(
      ["--workdir", str(tmp_path), "--model", "cnn", "--plot_only"])
  assert (tmp_path / "feature_scaling.png").stat().st_size > 1000
  assert (tmp_path / "lr_sweep_cnn.png").stat().st_size > 1000
  # The JSON is read, not rewritten: its command, commit and numbers stay.
  assert json.loads((tmp_path / "lr_sweep_cnn.json").read_text()) == record
  with pytest.raises(SystemExit, match="scale_invariance.json does not exist"):
    importlib.import_module("experiments.scale_invariance").main(
        ["--workdir", str(tmp_path), "--plot_only"])
