"""training.models: the MNIST CNN and the BN paper's MLP as pure functions, and
the linen ResNets of training.resnet behind the same interface."""

import functools

import chex
from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from training import models
from training import resnet


def _totals(model):
  rows = models.parameter_table(model)
  trainable = sum(row.trainable for row in rows)
  non_trainable = sum(row.non_trainable for row in rows)
  return trainable + non_trainable, trainable, non_trainable


def test_mnist_cnn_matches_the_keras_table_of_the_notes():
  model = models.mnist_cnn((28, 28, 1), 10)
  assert _totals(model) == (38_910, 38_650, 260)
  rows = {row.layer: row for row in models.parameter_table(model)}
  # The notes' Keras per-layer rows: shapes and counts.
  assert (rows["conv1"].output_shape, rows["conv1"].trainable) == ((24, 24, 10), 260)
  assert (rows["bn1"].trainable, rows["bn1"].non_trainable) == (20, 20)
  assert rows["pool1"].output_shape == (12, 12, 10)
  assert (rows["conv2"].output_shape, rows["conv2"].trainable) == ((8, 8, 20), 5020)
  assert rows["flatten"].output_shape == (320,)
  assert (rows["dense1"].trainable, rows["bn3"].non_trainable) == (32_100, 200)
  assert rows["dense2"].trainable == 1010
  text = models.format_parameter_table(models.parameter_table(model))
  assert "38,910" in text and "38,650" in text and "260" in text


def test_params_and_state_are_the_counted_pytrees():
  model = models.mnist_cnn((28, 28, 1), 10)
  params, state = model.init(jax.random.key(0))
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 38_650
  assert all(isinstance(s, jaxbn.BatchNormState) for s in state.values())
  assert sum(s.mean.size + s.var.size for s in state.values()) == 260


def test_bias_before_bn_false_drops_only_the_redundant_biases():
  with_bias = models.mnist_cnn(bias_before_bn=True)
  without = models.mnist_cnn(bias_before_bn=False)
  assert _totals(with_bias)[1] - _totals(without)[1] == 10 + 20 + 100
  params, _ = without.init(jax.random.key(0))
  assert "bias" not in params["conv1"] and "bias" in params["dense2"]
  no_bn = models.mnist_cnn(use_bn=False, bias_before_bn=False)
  params, state = no_bn.init(jax.random.key(0))
  assert state == {} and "bias" in params["conv1"]  # without BN the bias stays


def test_bn_paper_mlp_structure():
  model = models.bn_paper_mlp()
  kinds = [layer.kind for layer in model.layers]
  assert kinds == ["Flatten"] + ["Dense", "BatchNorm", "Sigmoid"] * 3 + ["Dense"]
  assert _totals(model)[2] == 3 * 200
  assert [layer.kind for layer in models.bn_paper_mlp(use_bn=False).layers].count(
      "BatchNorm") == 0


def test_apply_training_updates_state_and_eval_uses_it():
  model = models.mnist_cnn()
  params, state = model.init(jax.random.key(1))
  images = jax.random.uniform(jax.random.key(2), (8, 28, 28, 1))
  logits, new_state = model.apply(params, state, images, True)
  assert logits.shape == (8, 10) and logits.dtype == jnp.float32
  assert int(new_state["bn1"].count) == 1
  assert not np.allclose(new_state["bn1"].mean, state["bn1"].mean)
  eval_logits, same_state = model.apply(params, new_state, images, False)
  assert jax.tree.all(jax.tree.map(lambda a, b: a is b, same_state, new_state))
  assert eval_logits.shape == (8, 10)


def test_half_precision_keeps_float32_params_and_state():
  model = models.mnist_cnn()
  params, state = model.init(jax.random.key(1))
  images = jax.random.uniform(jax.random.key(2), (8, 28, 28, 1))
  logits, new_state = model.apply(params, state, images, True,
                                  compute_dtype=jnp.bfloat16)
  reference, _ = model.apply(params, state, images, True)
  assert logits.dtype == jnp.float32
  assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(new_state))
  np.testing.assert_allclose(logits, reference, atol=0.15)


def test_bad_model_name_and_input_shape():
  with pytest.raises(ValueError, match="unknown model 'resnet'"):
    models.create_model("resnet", input_shape=(28, 28, 1), num_classes=10)
  model = models.mnist_cnn()
  params, state = model.init(jax.random.key(0))
  with pytest.raises(ValueError, match=r"shape \(batch,\) \+ \(28, 28, 1\)"):
    model.apply(params, state, jnp.zeros((2, 32, 32, 3)), False)


def test_32x32_rgb_inputs():
  model = models.mnist_cnn((32, 32, 3), 100)
  rows = models.parameter_table(model)
  assert rows[-1].output_shape == (100,)
  assert [r for r in rows if r.layer == "flatten"][0].output_shape == (500,)


@pytest.mark.parametrize("conv", [models.conv_valid, models.conv_valid_in_loops],
                         ids=["conv_valid", "conv_valid_in_loops"])
@pytest.mark.parametrize("shape, kernel_shape", [((3, 28, 28, 1), (5, 5, 1, 10)),
                                                 ((2, 12, 11, 10), (5, 3, 10, 20))])
def test_conv_valid_equals_lax_convolution_values_and_gradients(shape, kernel_shape, conv):
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), kernel_shape)
  cotangent = jax.random.normal(jax.random.key(2), (
      shape[0], shape[1] - kernel_shape[0] + 1, shape[2] - kernel_shape[1] + 1,
      kernel_shape[3]))

  def reference(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)

  y, vjp = jax.vjp(conv, x, kernel)
  y_ref, vjp_ref = jax.vjp(reference, x, kernel)
  scale = float(jnp.abs(y_ref).max())
  np.testing.assert_allclose(y, y_ref, atol=1e-5 * scale)
  for grad, grad_ref in zip(vjp(cotangent), vjp_ref(cotangent)):
    np.testing.assert_allclose(grad, grad_ref, atol=1e-5 * float(jnp.abs(grad_ref).max()))


def test_max_pool_equals_reduce_window_and_drops_partial_windows():
  pool = models.max_pool("pool")
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))  # 9 rows: the last is dropped
  y, _ = pool.apply(None, None, x, models.ApplyContext(training=True))
  y_ref = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  assert y.shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(y, y_ref)
  # Without ties the gradient goes to each window's maximum, as reduce_window's.
  grad = jax.grad(lambda x: pool.apply(None, None, x, None)[0].sum())(x)
  grad_ref = jax.grad(lambda x: lax.reduce_window(
      x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID").sum())(x)
  np.testing.assert_array_equal(grad, grad_ref)


# --- ResNets (training.resnet, flax.linen with jaxbn.linen.BatchNorm) ----------

def _variables(module, input_shape):
  return jax.eval_shape(lambda key: module.init(key, jnp.zeros((1,) + input_shape),
                                                train=False), jax.random.key(0))


def _numbers(tree):
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _bn_layers(batch_stats):
  return sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(batch_stats)[0]
             if path[-1].key == "mean")


@pytest.mark.parametrize("name, input_shape, num_classes, params, bn_layers", [
    # He et al. 2016 (CIFAR, option A shortcuts): 0.27M, 0.46M, 0.85M.
    ("ResNet20", (32, 32, 3), 10, 269_722, 19),
    ("ResNet32", (32, 32, 3), 10, 464_154, 31),
    ("ResNet56", (32, 32, 3), 10, 853_018, 55),
    # torchvision's resnet18/34/50 (v1.5 has the same numbers as v1).
    ("ResNet18", (224, 224, 3), 1000, 11_689_512, 20),
    ("ResNet34", (224, 224, 3), 1000, 21_797_672, 36),
    ("ResNet50", (224, 224, 3), 1000, 25_557_032, 53),
])
def test_resnet_parameter_counts_and_bn_layers(name, input_shape, num_classes, params,
                                               bn_layers):
  variables = _variables(getattr(resnet, name)(num_classes=num_classes), input_shape)
  assert _numbers(variables["params"]) == params
  assert _bn_layers(variables["batch_stats"]) == bn_layers
  # A mean and a variance per BN scale.
  scales = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
      variables["params"])[0] if path[-1].key == "scale"]
  assert len(scales) == bn_layers
  assert _numbers(variables["batch_stats"]) == 2 * sum(s.size for s in scales)


def test_resnet_convolutions_have_no_bias_and_bn_follows_each():
  variables = _variables(resnet.ResNet50(num_classes=10), (64, 64, 3))
  flat = {jax.tree_util.keystr(path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
  convs = [k for k in flat if "Conv" in k or "conv" in k]
  assert convs and all(k.endswith("['kernel']") for k in convs)
  assert len(convs) == _bn_layers(variables["batch_stats"]) == 53
  assert [k for k in flat if k.endswith("['bias']") and "Dense" in k] == [
      "['Dense_0']['bias']"]


def test_resnet_v1_5_strides_the_bottleneck_3x3_conv():
  rows = models.parameter_table(models.linen_model(resnet.ResNet50(num_classes=10),
                                                   (64, 64, 3)))
  shapes = {row.layer: row.output_shape for row in rows}
  assert shapes["conv_init"] == (32, 32, 64)
  assert shapes["BottleneckBlock_2"] == (16, 16, 256)
  assert shapes["BottleneckBlock_3"] == (8, 8, 512)
  assert shapes["BottleneckBlock_15"] == (2, 2, 2048)
  kernels = _variables(resnet.ResNet50(num_classes=10), (64, 64, 3))["params"]
  block = kernels["BottleneckBlock_3"]  # first block of stage 2
  assert block["Conv_0"]["kernel"].shape[:2] == (1, 1)
  assert block["Conv_1"]["kernel"].shape[:2] == (3, 3)


@pytest.mark.parametrize("zero", [True, False])
def test_resnet_zero_init_of_the_last_bn_scale(zero):
  module = _tiny_resnet(zero_init_last_bn=zero)
  params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
  for block in ("BasicBlock_0", "BasicBlock_1", "BasicBlock_2"):
    np.testing.assert_array_equal(params[block]["BatchNorm_1"]["scale"], 0.0 if zero else 1.0)
    np.testing.assert_array_equal(params[block]["BatchNorm_0"]["scale"], 1.0)
  np.testing.assert_array_equal(params["bn_init"]["scale"], 1.0)


def _tiny_resnet(**kwargs):
  """A 3-stage, one-block-per-stage CIFAR ResNet of width 4 (fast to compile)."""
  return resnet.ResNet(stage_sizes=(1, 1, 1), block_cls=resnet.BasicBlock,
                       num_classes=10, num_filters=4, stem="cifar", shortcut="pad",
                       **kwargs)


def test_linen_model_on_28x28x1_trains_and_evaluates():
  model = models.linen_model(_tiny_resnet(zero_init_last_bn=False), (28, 28, 1))
  params, state = model.init(jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  logits, new_state = model.apply(params, state, images, True)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert not np.allclose(new_state["bn_init"]["mean"], state["bn_init"]["mean"])
  eval_logits, same_state = model.apply(params, new_state, images, False)
  assert same_state is new_state and eval_logits.shape == (4, 10)
  half, half_state = model.apply(params, state, images, True, compute_dtype=jnp.bfloat16)
  assert half.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(half_state))
  np.testing.assert_allclose(half, logits, atol=0.1 * float(jnp.abs(logits).max()))
  with pytest.raises(ValueError, match=r"shape \(batch,\) \+ \(28, 28, 1\)"):
    model.apply(params, state, jnp.zeros((2, 32, 32, 3)), False)


def test_flax_batch_norm_swap_gives_the_same_variables_and_outputs():
  images = jax.random.normal(jax.random.key(1), (4, 12, 12, 3))
  ours = _tiny_resnet(zero_init_last_bn=False)
  theirs = _tiny_resnet(zero_init_last_bn=False, norm=nn.BatchNorm)
  variables = ours.init(jax.random.key(0), images, train=False)
  flax_variables = theirs.init(jax.random.key(0), images, train=False)
  assert jax.tree.structure(variables) == jax.tree.structure(flax_variables)
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, flax_variables)
  chex.assert_trees_all_equal(variables, flax_variables)
  out, updates = ours.apply(variables, images, train=True, mutable=["batch_stats"])
  flax_out, flax_updates = theirs.apply(variables, images, train=True,
                                        mutable=["batch_stats"])
  np.testing.assert_allclose(out, flax_out, atol=1e-4)
  chex.assert_trees_all_close(updates, flax_updates, atol=1e-4)


def test_resnet_models_in_the_registry():
  model = models.create_model("resnet20", input_shape=(28, 28, 1), num_classes=10,
                              bias_before_bn=False, bn_momentum=0.9, bn_epsilon=1e-5)
  assert model.module.bn_momentum == 0.9 and model.layers == ()
  rows = models.parameter_table(model)
  assert sum(r.trainable for r in rows) == 269_722 - 288  # 1 input channel, not 3
  assert sum(r.non_trainable for r in rows) == 1376
  assert [r.layer for r in rows][:3] == ["conv_init", "bn_init", "BasicBlock_0"]
  assert "Non-trainable (BN running statistics): 1,376" in models.format_parameter_table(
      rows)
  with pytest.raises(ValueError, match="bias_before_bn=False"):
    models.create_model("resnet20", input_shape=(28, 28, 1), num_classes=10)
  with pytest.raises(ValueError, match="use_bn=True"):
    models.create_model("resnet20", input_shape=(28, 28, 1), num_classes=10,
                        use_bn=False, bias_before_bn=False)


def test_resnet_rejects_bad_attributes():
  with pytest.raises(ValueError, match="stem must be 'cifar' or 'imagenet'"):
    _tiny_resnet().clone(stem="vit").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="NHWC"):
    _tiny_resnet().init(jax.random.key(0), jnp.zeros((8, 8, 1)))


@pytest.mark.parametrize("kind", ["sequential", "linen"])
def test_recompute_bn_stats_pools_batches_with_equal_weight(kind):
  if kind == "linen":
    model = models.linen_model(_tiny_resnet(zero_init_last_bn=False), (12, 12, 1))
    first = ("bn_init",)
  else:
    model = models.mnist_cnn((16, 16, 1), 10, bias_before_bn=False)
    first = ("bn1",)
  params, state = model.init(jax.random.key(0))
  batches = [jax.random.uniform(jax.random.key(i), (8,) + model.input_shape) + i
             for i in (1, 2)]
  new_state = models.recompute_bn_stats(model, params, state, iter(batches + batches),
                                        num_batches=2)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  # The first BN layer sees the same inputs in any batch split: its pooled
  # statistics are those of both batches together.
  mean_of = (lambda s: s[first[0]]["mean"]) if kind == "linen" else (
      lambda s: s[first[0]].mean)
  var_of = (lambda s: s[first[0]]["var"]) if kind == "linen" else (
      lambda s: s[first[0]].var)
  together = models.recompute_bn_stats(model, params, state,
                                       [jnp.concatenate(batches)], num_batches=1)
  np.testing.assert_allclose(mean_of(new_state), mean_of(together), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var_of(new_state), var_of(together), rtol=1e-4, atol=1e-6)
  assert not np.allclose(mean_of(new_state), mean_of(state))
  with pytest.raises(ValueError, match="needs 3 batches, got 2"):
    models.recompute_bn_stats(model, params, state, iter(batches), num_batches=3)


def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window_on_ties():
  # Ties (a ReLU's zeros, repeated values): reduce_window's gradient picks one
  # element per window; the reshaped max's automatic gradient would split it.
  x = jnp.array([[1., 1., 0., 2.], [1., 0., 2., 2.], [0., 0., 3., 0.],
                 [0., 0., 0., 3.]]).reshape(1, 4, 4, 1)
  cotangent = jnp.array([1., 2., 3., 4.]).reshape(1, 2, 2, 1)
  _, vjp = jax.vjp(lambda x: models.max_pool_2d(x, 2), x)
  _, vjp_ref = jax.vjp(lambda x: lax.reduce_window(
      x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"), x)
  np.testing.assert_array_equal(vjp(cotangent)[0], vjp_ref(cotangent)[0])
  assert float(vjp(cotangent)[0].sum()) == 10.0


@pytest.mark.parametrize("shape, kernel_shape", [((3, 10, 9, 1), (5, 5, 1, 4)),
                                                 ((2, 9, 8, 3), (3, 3, 3, 5))])
def test_conv_valid_cpu_gradient_under_jit_and_in_bfloat16(shape, kernel_shape):
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), kernel_shape)

  def loss(conv, x, kernel):
    return jnp.sum(jnp.tanh(conv(x, kernel)))

  def reference(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)

  grads = jax.jit(jax.grad(functools.partial(loss, models.conv_valid_cpu),
                           argnums=(0, 1)))(x, kernel)
  grads_ref = jax.grad(functools.partial(loss, reference), argnums=(0, 1))(x, kernel)
  for grad, grad_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(grad, grad_ref, atol=1e-4 * float(jnp.abs(grad_ref).max()))
  y16 = models.conv_valid_cpu(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  grads16 = jax.grad(lambda x, k: jnp.sum(models.conv_valid_cpu(x, k).astype(jnp.float32)),
                     argnums=(0, 1))(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert [g.dtype for g in grads16] == [jnp.bfloat16, jnp.bfloat16]


def test_mnist_cnn_with_the_loop_convolution_matches_the_default_one():
  # Same parameters, same outputs: the experiments' models differ only in speed.
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  default = models.create_model("cnn", input_shape=(28, 28, 1), num_classes=10)
  looped = models.create_model("cnn", input_shape=(28, 28, 1), num_classes=10,
                               conv=models.conv_valid_in_loops)
  params, state = default.init(jax.random.key(1))
  chex.assert_trees_all_equal_shapes_and_dtypes(params, looped.init(jax.random.key(1))[0])
  y, _ = default.apply(params, state, x, True)
  y_looped, _ = looped.apply(params, state, x, True)
  chex.assert_trees_all_close(y_looped, y, atol=1e-5, rtol=1e-5)
