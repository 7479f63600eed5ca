"""Tests of jaxbn.from_torch / to_torch against torch.nn.BatchNorm."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

torch = pytest.importorskip("torch")

TORCH_MOMENTUM = 0.3


def _trained_torch_bn(num_features=5, *, affine=True, steps=3, dims=2):
  """A torch BatchNorm after a few training steps on data with mean 2, std 3."""
  torch.manual_seed(0)
  module_type = torch.nn.BatchNorm2d if dims == 2 else torch.nn.BatchNorm1d
  bn = module_type(num_features, momentum=TORCH_MOMENTUM, affine=affine)
  if affine:
    with torch.no_grad():
      bn.weight.uniform_(0.5, 2.0)
      bn.bias.normal_()
  bn.train()
  for _ in range(steps):
    shape = (4, num_features, 3, 3) if dims == 2 else (6, num_features)
    bn(torch.randn(shape) * 3 + 2)
  return bn.eval()


@pytest.mark.parametrize("affine", [True, False])
def test_eval_outputs_equal_torch_nchw_and_nhwc(affine):
  bn = _trained_torch_bn(affine=affine)
  params, state = jaxbn.from_torch(bn.state_dict())
  assert (params is None) == (not affine)
  assert int(state.count) == 3
  x_nchw = np.random.default_rng(0).normal(2, 3, (3, 5, 4, 4)).astype(np.float32)
  with torch.no_grad():
    expected = bn(torch.from_numpy(x_nchw)).numpy()
  y_nchw, _ = jaxbn.batch_norm(params, state, x_nchw, training=False, axis=1)
  np.testing.assert_allclose(y_nchw, expected, rtol=1e-5, atol=1e-5)
  y_nhwc, _ = jaxbn.batch_norm(params, state, x_nchw.transpose(0, 2, 3, 1),
                               training=False)
  np.testing.assert_allclose(y_nhwc.transpose(0, 3, 1, 2), expected, rtol=1e-5,
                             atol=1e-5)


def test_round_trip_is_exact_and_loads_into_torch():
  bn = _trained_torch_bn(dims=1)
  original = bn.state_dict()
  converted = jaxbn.to_torch(*jaxbn.from_torch(original))
  assert list(converted) == list(original)
  for key, value in original.items():
    assert converted[key].dtype == value.dtype, key
    assert torch.equal(converted[key], value), key
  fresh = torch.nn.BatchNorm1d(5)
  fresh.load_state_dict(converted)  # strict: same keys, shapes


def test_affine_false_round_trip():
  bn = _trained_torch_bn(affine=False)
  params, state = jaxbn.from_torch(bn.state_dict())
  converted = jaxbn.to_torch(params, state)
  assert set(converted) == {"running_mean", "running_var", "num_batches_tracked"}
  torch.nn.BatchNorm2d(5, affine=False).load_state_dict(converted)


def test_training_step_with_converted_momentum_matches_torch():
  bn = _trained_torch_bn()
  params, state = jaxbn.from_torch(bn.state_dict())
  x = np.random.default_rng(1).normal(-1, 2, (4, 5, 3, 3)).astype(np.float32)
  bn.train()
  expected_y = bn(torch.from_numpy(x)).detach().numpy()
  y, new_state = jaxbn.batch_norm(params, state, x, training=True, axis=1,
                                  momentum=1 - TORCH_MOMENTUM, unbiased_running_var=True)
  np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_state.mean, bn.running_mean.numpy(), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(new_state.var, bn.running_var.numpy(), rtol=1e-5)
  assert int(new_state.count) == int(bn.num_batches_tracked) == 4
  reloaded = jaxbn.to_torch(params, new_state)
  np.testing.assert_allclose(reloaded["running_var"].numpy(), bn.running_var.numpy(),
                             rtol=1e-5)


def test_cumulative_average_uses_num_batches_tracked():
  torch.manual_seed(0)
  bn = torch.nn.BatchNorm1d(3, momentum=None)
  for _ in range(2):
    bn(torch.randn(8, 3) + 1)
  params, state = jaxbn.from_torch(bn.state_dict())
  x = np.random.default_rng(2).normal(0, 1, (8, 3)).astype(np.float32)
  bn(torch.from_numpy(x))
  _, new_state = jaxbn.batch_norm(params, state, x, training=True, axis=1, momentum=None,
                                  unbiased_running_var=True)
  np.testing.assert_allclose(new_state.mean, bn.running_mean.numpy(), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(new_state.var, bn.running_var.numpy(), rtol=1e-5)


def test_from_torch_accepts_numpy_and_old_checkpoints_and_bfloat16():
  arrays = {"weight": np.ones(4, np.float32), "bias": np.zeros(4, np.float32),
            "running_mean": np.arange(4, dtype=np.float32),
            "running_var": np.full(4, 2.0, np.float32)}
  params, state = jaxbn.from_torch(arrays)  # no num_batches_tracked (torch < 0.4.1)
  assert int(state.count) == 0 and state.count.dtype == jnp.int32
  np.testing.assert_array_equal(state.mean, arrays["running_mean"])
  bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in arrays.items()}
  params, state = jaxbn.from_torch(bf16)
  assert params.scale.dtype == jnp.bfloat16 and state.var.dtype == jnp.float32
  assert jaxbn.to_torch(params, state)["weight"].dtype == torch.bfloat16


def test_from_torch_errors():
  good = _trained_torch_bn().state_dict()
  with pytest.raises(ValueError, match=r"unexpected keys \['bn1.weight'\]"):
    jaxbn.from_torch({**good, "bn1.weight": good["weight"]})
  with pytest.raises(ValueError, match="track_running_stats=False"):
    jaxbn.from_torch(torch.nn.BatchNorm2d(5, track_running_stats=False).state_dict())
  with pytest.raises(ValueError, match="'weight' but not 'bias'"):
    jaxbn.from_torch({k: v for k, v in good.items() if k != "bias"})
  with pytest.raises(ValueError, match=r"state_dict\['running_var'\] has shape \(4,\)"):
    jaxbn.from_torch({**good, "running_var": torch.ones(4)})
  with pytest.raises(TypeError, match="mapping"):
    jaxbn.from_torch([1, 2])
