"""Test configuration: 8 virtual CPU devices and strict JAX semantics.

XLA_FLAGS must be set before jax is first imported, which is why this runs at
conftest import time.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (used by tensorflow-datasets) must leave accelerators to JAX.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def mesh8():
  """A 1-D mesh ('data',) over the 8 virtual CPU devices."""
  assert jax.device_count() == 8, "conftest must force 8 CPU devices"
  return jax.make_mesh((8,), ("data",))


@pytest.fixture
def classic_threefry():
  """The classic (non-partitionable) threefry for the test's random draws.

  Models' initializers draw random numbers; the partitionable threefry takes
  tens of seconds to compile per shape on a loaded 2-core CPU, the classic one
  about one. Use where which bits are drawn does not matter:
  `pytestmark = pytest.mark.usefixtures("classic_threefry")`.
  """
  with jax.threefry_partitionable(False):
    yield
