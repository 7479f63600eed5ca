"""benchmarks/train_step.py runs (its tiny mode) and reports both batch norms."""

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def test_train_step_benchmark_tiny_mode(capsys):
  spec = importlib.util.spec_from_file_location("train_step_benchmark", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  result = module.main(["--tiny"])
  assert set(result["examples_per_sec"]) == {"jaxbn", "flax.linen", "no BN"}
  assert all(value > 0 for value in result["examples_per_sec"].values())
  assert result["speedup_jaxbn_vs_flax"] > 0
  assert "jaxbn vs flax.linen, whole step" in capsys.readouterr().out
