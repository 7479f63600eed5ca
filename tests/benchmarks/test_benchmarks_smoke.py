"""Smoke tests: every benchmark script runs in its tiny mode and prints its tables.

Timings are never asserted (the machine is shared); what is asserted is
deterministic: table structure, collective counts, accuracy columns.
"""

import json
import re

import numpy as np
import pytest

from benchmarks import accuracy
from benchmarks import bn_op
from benchmarks import collectives
from benchmarks import train_step_resnet


def _table_rows(text: str, first_cell_pattern: str) -> list[list[str]]:
  rows = []
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and re.fullmatch(first_cell_pattern, cells[0]):
      rows.append(cells)
  return rows


def test_bn_op_tiny(capsys):
  bn_op.main(["--tiny", "--dtypes", "f32", "--repeats", "1", "--torch-layouts", "NCHW",
              "--malloc", "default",
              "--impls", "jaxbn,flax.linen,equinox (mode='batch')"])
  out = capsys.readouterr().out
  assert "Command: `" in out and "### Targets" in out
  train = out.split("### Train mode")[1].split("### Inference")[0]
  rows = _table_rows(train, r"\(\d+(,\d+)*\)")
  names = {row[2] for row in rows}
  assert {"jaxbn", "flax.linen", "equinox (mode='batch')",
          "copy x*2 (bandwidth probe)"} <= names
  assert any(name.startswith("torch BatchNorm2d") for name in names)
  errors = {(row[0], row[2]): row[9] for row in rows}
  # Accuracy at mean/std 3000 in float32: jaxbn exact, flax's fast variance not.
  for shape in ("(4,3,3,8)", "(16,8)"):
    assert float(errors[(shape, "jaxbn")]) < 1e-5
    assert float(errors[(shape, "flax.linen")]) > 1e-2
  # jaxbn's compiled fwd+bwd makes the floor's passes over memory: 6 reads +
  # 2 writes of x-sized arrays (a change in the core's fusion shows up here).
  memory = out.split("### Compiled temporary memory")[1]
  passes = {(row[0], row[2]): row[6] for row in _table_rows(memory, r"\(\d+(,\d+)*\)")}
  assert passes[("(4,3,3,8)", "jaxbn")] == "6 + 2"
  assert passes[("(16,8)", "jaxbn")] == "6 + 2"


def test_collectives_tiny(capsys):
  collectives.main(["--tiny", "--impls", "jaxbn,flax.linen"])
  out = capsys.readouterr().out
  rows = {row[1]: row for row in _table_rows(out, r"\(\d+(,\d+)*\)")}
  # jaxbn under shard_map: one all-reduce forward, two forward + backward.
  assert rows["jaxbn"][2] == "1 (1 all-reduce)"
  assert rows["jaxbn"][3] == "2 (2 all-reduce)"
  assert rows["jaxbn"][4] == "yes"
  assert rows["flax.linen"][2].startswith("1 ")


def test_accuracy_tiny(capsys):
  accuracy.main(["--tiny", "--impls", "jaxbn,haiku", "--torch-layouts", "NCHW"])
  out = capsys.readouterr().out
  f32 = out.split("### f32")[1].split("### bf16")[0]
  means = _table_rows(f32, "shape")[0][2:]
  assert means == ["mean 0", "mean 100", "mean 3000", "mean 100000"]
  rows = {row[1]: dict(zip(means, row[2:]))
          for row in _table_rows(f32, r"\(64,8\)")}
  # What BENCHMARKS.md states: jaxbn stays at float32 rounding for every mean;
  # haiku's one-pass E[x^2] - E[x]^2 variance is exact on centred data and NaN
  # (a negative variance) at mean/std 3000.
  assert all(float(e) < 1e-6 for e in rows["jaxbn"].values()), rows["jaxbn"]
  assert float(rows["haiku"]["mean 0"]) < 1e-6, rows["haiku"]
  assert rows["haiku"]["mean 3000"] == "nan", rows["haiku"]


@pytest.mark.parametrize("args", [["--tiny", "--malloc", "default"]])
def test_train_step_resnet_tiny(capsys, args):
  verdicts = train_step_resnet.main(args)
  out = capsys.readouterr().out
  names = [row[0] for row in _table_rows(out, r"[a-z].*") if row[0] != "normalization"]
  assert names == ["jaxbn.linen.BatchNorm", "flax.linen.BatchNorm",
                   "no normalization (reference)"] * 2
  assert len(verdicts) == 2 and all(v["wall_ratio"] > 0 for v in verdicts.values())
  assert out.count("(rule: both <= 1.05x)") == 2


def test_mnist_cnn_train_step_tiny(capsys):
  # benchmarks/train_step.py belongs to train.py's owner; run here so every
  # benchmark script has a smoke test.
  from benchmarks import train_step
  result = train_step.main(["--tiny"])
  assert set(result["examples_per_sec"]) == {"jaxbn", "flax.linen", "no BN"}
  # Each variant trained the same steps from the same weights: jaxbn's and
  # flax's BN compute the same losses (to rounding); without BN they differ.
  assert set(result["train_steps"].values()) == {1 + 2 * 2}
  losses = result["mean_train_loss"]
  assert losses["jaxbn"] == pytest.approx(losses["flax.linen"], rel=1e-4)
  assert abs(losses["no BN"] - losses["jaxbn"]) > 1e-3
  out = capsys.readouterr().out
  for name, per_sec in result["examples_per_sec"].items():
    assert f"{per_sec:>14,.0f}" in out, name


def test_scaling_page_is_what_the_script_writes(tmp_path):
  """docs/scaling.md holds the numbers `python -m benchmarks.scaling` computes now."""
  from benchmarks import scaling
  page = tmp_path / "scaling.md"
  scaling.main(["--output", str(page)])
  text = page.read_text()
  assert "| 1024 |" in text and "53 BN layers" in text
  assert text == scaling.OUTPUT.read_text(), (
      "docs/scaling.md is stale: rerun `python -m benchmarks.scaling`.")


def test_compiled_json_append_replaces_rows_of_the_same_variant(tmp_path, monkeypatch):
  from benchmarks import compiled
  path = str(tmp_path / "rows.json")
  row = dict(target="h100:2", model="resnet50", dtype="bf16", parallelism="gspmd")
  monkeypatch.setattr(compiled._harness, "command_line", lambda: "first")
  compiled.write_json(path, [dict(row, norm="jaxbn", bytes=1), dict(row, norm="flax", bytes=2)])
  monkeypatch.setattr(compiled._harness, "command_line", lambda: "second")
  compiled.write_json(path, [dict(row, norm="jaxbn", bytes=3),
                             dict(row, target="a100:2", norm="jaxbn", bytes=4)], append=True)
  merged = json.loads(open(path).read())
  assert merged["commands"] == ["first", "second"]
  assert [(r["target"], r["norm"], r["bytes"]) for r in merged["rows"]] == [
      ("h100:2", "flax", 2), ("h100:2", "jaxbn", 3), ("a100:2", "jaxbn", 4)]
  # A rerun command moves to the end, where its rows now come from.
  monkeypatch.setattr(compiled._harness, "command_line", lambda: "first")
  compiled.write_json(path, [dict(row, norm="flax", bytes=6)], append=True)
  merged = json.loads(open(path).read())
  assert merged["commands"] == ["second", "first"]
  assert [(r["target"], r["norm"], r["bytes"]) for r in merged["rows"]] == [
      ("h100:2", "jaxbn", 3), ("a100:2", "jaxbn", 4), ("h100:2", "flax", 6)]
  compiled.write_json(path, [dict(row, norm="none", bytes=5)])  # no append: a new file
  assert json.loads(open(path).read())["commands"] == ["first"]


def test_accelerator_tiny(capsys):
  from benchmarks import accelerator
  accelerator.main(["--tiny", "--dtypes", "bf16", "--repeats", "1"])
  out = capsys.readouterr().out
  assert "cpu" in out.split("\n")[0]  # the device name is in the title
  bn = out.split("### One BN layer")[1].split("### BN of one ResNet-50 step")[0]
  rows = _table_rows(bn, r"\(\d+(,\d+)*\)")
  assert {(row[3], row[4]) for row in rows} == {
      (mode, name) for mode in ("train", "infer") for name in ("jaxbn", "flax.linen")}
  step = out.split("### tiny bottleneck ResNet")[1]
  names = [row[0] for row in _table_rows(step, r"[a-z].*")]
  assert names[-3:] == ["jaxbn.linen.BatchNorm", "flax.linen.BatchNorm",
                        "no normalization (reference)"]


def test_peers_tiny(capsys, tmp_path):
  # train.py and PyTorch (its defaults, and OMP_WAIT_POLICY=PASSIVE) each in
  # their own subprocess, one short epoch.
  from benchmarks import peers
  passive = peers.TORCH_PASSIVE
  summary = peers.main(["--tiny", "--peers", f"train.py,torch NCHW,{passive}",
                        "--batch_sizes", "64", "--json", str(tmp_path / "peers.json")])
  out = capsys.readouterr().out
  # On a fresh clone tfds first prints that it prepares MNIST; the table follows.
  assert "### MNIST CNN end to end" in out
  out = out[out.index("### MNIST CNN end to end"):]
  assert "`python" in out
  rows = {row[1]: row for row in _table_rows(out, r"\d+")}
  assert set(rows) == {"train.py (first run)", "train.py", "torch NCHW", passive}
  for name, row in rows.items():
    entry = summary[(name, 64)]
    assert entry["runs"] == 1 and not entry["errors"], entry
    assert entry["images_per_sec"] > 0 and entry["wall_seconds"] > 0
    # The table shows the summary's numbers.
    assert row[2] == f"{entry['images_per_sec']:,.0f}"
    assert row[4] == f"{100 * entry['test_accuracy']:.2f}%"
    # 20 steps of 64 reach well above chance (10%) on the 200 test images.
    assert 0.2 < entry["test_accuracy"] <= 1.0, (name, entry)
  # A rerun of train.py reads its steps from the compilation cache and
  # computes the same numbers; the OpenMP wait policy changes no number either.
  assert (summary[("train.py", 64)]["test_accuracy"]
          == summary[("train.py (first run)", 64)]["test_accuracy"])
  assert summary[("torch NCHW", 64)]["test_accuracy"] == summary[(passive, 64)]["test_accuracy"]
  # The ratios are train.py's median over the best PyTorch row's.
  ours = summary[("train.py", 64)]
  best_torch = max(summary[(p, 64)]["images_per_sec"] for p in ("torch NCHW", passive))
  assert ours["vs_torch_images_per_sec"] == pytest.approx(ours["images_per_sec"] / best_torch)
  assert ours["round_vs_torch_images_per_sec"] == [
      pytest.approx(ours["vs_torch_images_per_sec"])]
  assert rows["train.py"][5].startswith(f"{ours['vs_torch_images_per_sec']:.2f}x images/s")
  assert "Target (train.py images/s >= 1.0x" in out
  # Each PyTorch run says how it ran.
  samples = json.loads((tmp_path / "peers.json").read_text())["samples"]
  assert samples["torch NCHW@64"][0]["omp_wait_policy"] == ""
  assert samples[f"{passive}@64"][0]["omp_wait_policy"] == "PASSIVE"
  assert samples["torch NCHW@64"][0]["threads"] >= 1


def test_peers_torch_worker_profiles_its_steps(capsys):
  from benchmarks import peers
  peers.main(["--worker", peers.TORCH_PASSIVE, "--profile_steps", "3", "--epochs", "1",
              "--num_train", "640", "--num_eval", "100", "--batch_size", "64"])
  captured = capsys.readouterr()
  assert "steps 5-7 of epoch 1" in captured.err
  assert "aten::convolution_backward" in captured.err
  (line,) = [l for l in captured.out.splitlines() if l.startswith(peers.RESULT_PREFIX)]
  result = json.loads(line[len(peers.RESULT_PREFIX):])
  assert result["omp_wait_policy"] == "PASSIVE" and result["images_per_sec"] > 0


def test_cpu_paths_tiny(capsys):
  from benchmarks import cpu_paths
  result = cpu_paths.main(["--tiny"])
  # The eval batch size changes the speed, never the metrics.
  metrics = result["eval_metrics"]
  assert set(metrics) == set(result["eval_images_per_sec"]) == {50, 100}
  assert metrics[50]["accuracy"] == metrics[100]["accuracy"]
  assert metrics[50]["loss"] == pytest.approx(metrics[100]["loss"], rel=1e-5)
  assert 0.0 <= metrics[50]["accuracy"] <= 1.0 and np.isfinite(metrics[50]["loss"])
  # Both harness convolutions train the same instances to the same parameters.
  assert set(result["harness_seconds"]) == {"models.ValidConv", "models.LoopConv"}
  assert result["harness_params_difference"] < 1e-4
  out = capsys.readouterr().out
  for batch, images_per_sec in result["eval_images_per_sec"].items():
    assert f"| {batch} | {images_per_sec:,.0f} |" in out
