"""The extras resolve from PyPI on the machines JAX users have, without installing anything.

`uv pip compile --python-platform` resolves pyproject.toml's requirements for a target
platform (its environment markers and wheel tags), so a Linux CI run checks what a Mac or
a Linux aarch64 user gets from `pip install -e ".[dev]"`. It needs PyPI (CI has it): the
test skips when PyPI cannot be reached, and when uv (in the `dev` extra) is missing.
"""

import os
import pathlib
import re
import subprocess
import sys
import urllib.request

import pytest

_PYPROJECT = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"

# uv's target triple -> the TensorFlow distribution the `train` extra must pick there.
_PLATFORMS = {
    "x86_64-unknown-linux-gnu": "tensorflow-cpu",
    "aarch64-unknown-linux-gnu": "tensorflow",
    "aarch64-apple-darwin": "tensorflow",
}


def _uv() -> list[str]:
  try:
    subprocess.run([sys.executable, "-m", "uv", "--version"], check=True,
                   capture_output=True)
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("uv is not installed (it comes with the dev extra)")
  return [sys.executable, "-m", "uv"]


def _require_pypi() -> None:
  try:
    urllib.request.urlopen("https://pypi.org/simple/jax/", timeout=10).close()
  except OSError as e:
    pytest.skip(f"PyPI is not reachable: {e}")


def resolve(platform: str, extra: str) -> dict[str, str]:
  """`{name: version}` that uv resolves for `.[extra]` on `platform`, Python 3.11."""
  command = [*_uv(), "pip", "compile", str(_PYPROJECT), "--extra", extra,
             "--python-platform", platform, "--python-version", "3.11",
             "--no-header", "--no-annotate", "--quiet"]
  # The oldest macOS that JAX's and TensorFlow's arm64 wheels support.
  env = {**os.environ, "MACOSX_DEPLOYMENT_TARGET": "13.0"}
  result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
  assert result.returncode == 0, f"{platform}, .[{extra}]:\n{result.stderr}"
  return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", result.stdout, flags=re.M))


@pytest.mark.parametrize("platform", sorted(_PLATFORMS))
def test_dev_extra_resolves_from_pypi(platform):
  _require_pypi()
  pinned = resolve(platform, "dev")
  for name in ("jax", "jaxlib", "flax", "optax", "torch", "tensorflow-datasets",
               "orbax-checkpoint", "equinox", "dm-haiku", "pytest", "mkdocs"):
    assert name in pinned, f"{name} missing from the {platform} resolution"
  wanted = _PLATFORMS[platform]
  other = ({"tensorflow", "tensorflow-cpu"} - {wanted}).pop()
  assert wanted in pinned and other not in pinned, (platform, sorted(pinned))
  if platform == "x86_64-unknown-linux-gnu":
    assert pinned["torch"] == "2.13.0", pinned["torch"]  # the release CI tests


def test_torch_extra_takes_any_torch_with_the_api_used():
  # Not a pin: a newer torch than the one CI tests resolves on its own.
  _require_pypi()
  assert resolve("aarch64-unknown-linux-gnu", "torch")["torch"] != "2.13.0"
