"""training.models (the MNIST CNN and the BN paper's MLP as linen modules, the
parameter table), training.ops (their CPU kernels) and training.resnet."""

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
from training import ops
from training import resnet

MNIST = (28, 28, 1)


def _init(model, input_shape=MNIST, key=0):
  return model.init(jax.random.key(key), jnp.zeros((1,) + input_shape), train=False)


def _train(model, variables, x):
  return model.apply(variables, x, train=True, mutable=["batch_stats"])


def _totals(model, input_shape=MNIST):
  rows = models.parameter_table(model, input_shape)
  trainable = sum(row.trainable for row in rows)
  non_trainable = sum(row.non_trainable for row in rows)
  return trainable + non_trainable, trainable, non_trainable


def test_mnist_cnn_matches_the_keras_table_of_the_notes():
  model = models.MnistCNN(num_classes=10)
  assert _totals(model) == (38_910, 38_650, 260)
  rows = models.parameter_table(model, MNIST)
  # The notes' Keras layers, in their order (the parameter-free ones included).
  assert [(row.layer, row.kind) for row in rows] == [
      ("conv1", "ValidConv"), ("bn1", "BatchNorm"), ("relu1", "ReLU"), ("pool1", "MaxPool2D"),
      ("conv2", "ValidConv"), ("bn2", "BatchNorm"), ("relu2", "ReLU"), ("pool2", "MaxPool2D"),
      ("flatten", "Flatten"), ("dense1", "Dense"), ("bn3", "BatchNorm"), ("relu3", "ReLU"),
      ("dense2", "Dense")]
  rows = {row.layer: row for row in rows}
  # The notes' Keras per-layer rows: shapes and counts.
  assert (rows["conv1"].output_shape, rows["conv1"].trainable) == ((24, 24, 10), 260)
  assert (rows["bn1"].output_shape, rows["bn1"].trainable,
          rows["bn1"].non_trainable) == ((24, 24, 10), 20, 20)
  assert (rows["conv2"].output_shape, rows["conv2"].trainable) == ((8, 8, 20), 5020)
  assert (rows["pool2"].output_shape, rows["flatten"].output_shape) == ((4, 4, 20), (320,))
  assert sum(rows[name].trainable + rows[name].non_trainable
             for name in ("relu1", "pool1", "relu2", "pool2", "flatten", "relu3")) == 0
  assert (rows["dense1"].trainable, rows["bn3"].non_trainable) == (32_100, 200)
  assert (rows["dense2"].output_shape, rows["dense2"].trainable) == ((10,), 1010)
  # Pooling twice and flattening: 4 x 4 x 20 inputs of dense1.
  assert _init(model)["params"]["dense1"]["kernel"].shape == (320, 100)
  text = models.format_parameter_table(models.parameter_table(model, MNIST))
  assert "38,910" in text and "38,650" in text and "260" in text


def test_variables_are_the_counted_pytrees():
  variables = _init(models.MnistCNN())
  assert set(variables) == {"params", "batch_stats"}
  assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == 38_650
  assert set(variables["batch_stats"]) == {"bn1", "bn2", "bn3"}
  assert all(set(stats) == {"mean", "var"} for stats in variables["batch_stats"].values())
  assert sum(leaf.size for leaf in jax.tree.leaves(variables["batch_stats"])) == 260


def test_bias_before_bn_false_drops_only_the_redundant_biases():
  with_bias = models.MnistCNN(bias_before_bn=True)
  without = models.MnistCNN(bias_before_bn=False)
  assert _totals(with_bias)[1] - _totals(without)[1] == 10 + 20 + 100
  params = _init(without)["params"]
  assert "bias" not in params["conv1"] and "bias" in params["dense2"]
  variables = _init(models.MnistCNN(use_bn=False, bias_before_bn=False))
  assert "batch_stats" not in variables and "bias" in variables["params"]["conv1"]


def test_bn_paper_mlp_structure():
  rows = models.parameter_table(models.BNPaperMLP(), MNIST)
  assert [(row.layer, row.kind) for row in rows] == [
      ("dense1", "Dense"), ("bn1", "BatchNorm"), ("dense2", "Dense"), ("bn2", "BatchNorm"),
      ("dense3", "Dense"), ("bn3", "BatchNorm"), ("dense4", "Dense")]
  # 784 -> 100 -> 100 -> 100 -> 10 dense layers, a scale and an offset per BN feature.
  assert _totals(models.BNPaperMLP()) == (100_910, 100_310, 600)
  rows = models.parameter_table(models.BNPaperMLP(use_bn=False), MNIST)
  assert [row.kind for row in rows] == ["Dense"] * 4


def test_train_updates_batch_stats_and_eval_uses_them():
  model = models.MnistCNN()
  variables = _init(model, key=1)
  images = jax.random.uniform(jax.random.key(2), (8,) + MNIST)
  logits, updates = _train(model, variables, images)
  assert logits.shape == (8, 10) and logits.dtype == jnp.float32
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])
  assert not np.allclose(updates["batch_stats"]["bn1"]["mean"],
                         variables["batch_stats"]["bn1"]["mean"])
  trained = {"params": variables["params"], **updates}
  eval_logits = model.apply(trained, images, train=False)
  assert eval_logits.shape == (8, 10)
  assert not np.allclose(eval_logits, model.apply(variables, images, train=False))


def test_half_precision_keeps_float32_params_and_state():
  model = models.MnistCNN()
  variables = _init(model, key=1)
  images = jax.random.uniform(jax.random.key(2), (8,) + MNIST)
  logits, updates = _train(model.clone(dtype=jnp.bfloat16), variables, images)
  reference, _ = _train(model, variables, images)
  assert logits.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))
  np.testing.assert_allclose(logits, reference, atol=0.15)


def _functional_cnn(params, stats, x, training):
  """The MNIST CNN written with the core API (`jaxbn.batch_norm`) and lax ops."""
  def bn(name, x):
    state = jaxbn.BatchNormState(stats[name]["mean"], stats[name]["var"],
                                 jnp.zeros((), jnp.int32))
    return jaxbn.batch_norm(jaxbn.BatchNormParams(**params[name]), state, x,
                            training=training, momentum=models.KERAS_BN_MOMENTUM,
                            epsilon=models.KERAS_BN_EPSILON)

  def conv(name, x):
    return ops.conv_lax(x, params[name]["kernel"]) + params[name]["bias"][None, None, None]

  def pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

  new_stats = {}
  for layer in ("1", "2"):
    y, new_stats["bn" + layer] = bn("bn" + layer, conv("conv" + layer, x))
    x = pool(jax.nn.relu(y))
  x = x.reshape(x.shape[0], -1) @ params["dense1"]["kernel"] + params["dense1"]["bias"][None]
  y, new_stats["bn3"] = bn("bn3", x)
  x = jax.nn.relu(y) @ params["dense2"]["kernel"] + params["dense2"]["bias"][None]
  return x, {name: {"mean": s.mean, "var": s.var} for name, s in new_stats.items()}


@pytest.mark.parametrize("training", [False, True])
def test_mnist_cnn_computes_what_the_core_api_computes(training):
  model = models.MnistCNN()
  variables = _init(model, key=3)
  # Running statistics away from their initial values.
  variables["batch_stats"] = jax.tree.map(
      lambda leaf: leaf + jax.random.uniform(jax.random.key(4), leaf.shape),
      variables["batch_stats"])
  x = jax.random.uniform(jax.random.key(5), (16,) + MNIST)
  expected, expected_stats = _functional_cnn(variables["params"], variables["batch_stats"],
                                             x, training)
  if training:
    logits, updates = _train(model, variables, x)
    chex.assert_trees_all_close(updates["batch_stats"], expected_stats, atol=1e-6)
  else:
    logits = model.apply(variables, x, train=False)
  np.testing.assert_allclose(logits, expected, atol=2e-5)


def test_norm_is_an_attribute_flax_batch_norm_gives_the_same_variables():
  ours = models.MnistCNN()
  theirs = models.create_model("cnn", num_classes=10, norm=nn.BatchNorm)
  variables = _init(ours)
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, _init(theirs))
  images = jax.random.uniform(jax.random.key(1), (8,) + MNIST)
  out, updates = _train(ours, variables, images)
  flax_out, flax_updates = _train(theirs, variables, images)
  np.testing.assert_allclose(out, flax_out, atol=1e-4)
  chex.assert_trees_all_close(updates, flax_updates, atol=1e-5)


def test_bad_model_names_and_attributes():
  with pytest.raises(ValueError, match="unknown model 'resnet'"):
    models.create_model("resnet", num_classes=10)
  with pytest.raises(ValueError, match="conv is an attribute of model 'cnn' only"):
    models.create_model("mlp", num_classes=10, conv=models.LoopConv)


def test_32x32_rgb_inputs():
  model = models.create_model("cnn", num_classes=100)
  rows = models.parameter_table(model, (32, 32, 3))
  assert rows[-1].output_shape == (100,)
  assert _init(model, (32, 32, 3))["params"]["dense1"]["kernel"].shape == (500, 100)


def _lax_conv(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  precision=lax.Precision.HIGHEST)


CONVOLUTIONS = {
    "conv_matmuls": ops.conv_matmuls, "conv_im2col": ops.conv_im2col,
    "conv_valid": ops.conv_valid,
    "conv_valid_im2col": functools.partial(ops.conv_valid, cpu=ops.conv_im2col)}


@pytest.mark.parametrize("conv", list(CONVOLUTIONS.values()), ids=list(CONVOLUTIONS))
@pytest.mark.parametrize("shape, kernel_shape", [((3, 28, 28, 1), (5, 5, 1, 10)),
                                                 ((2, 12, 11, 10), (5, 3, 10, 20))])
def test_convolutions_equal_lax_convolution_values_and_gradients(shape, kernel_shape, conv):
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), kernel_shape)
  cotangent = jax.random.normal(jax.random.key(2), (
      shape[0], shape[1] - kernel_shape[0] + 1, shape[2] - kernel_shape[1] + 1,
      kernel_shape[3]))
  y, vjp = jax.vjp(conv, x, kernel)
  y_ref, vjp_ref = jax.vjp(_lax_conv, x, kernel)
  scale = float(jnp.abs(y_ref).max())
  np.testing.assert_allclose(y, y_ref, atol=1e-5 * scale)
  for grad, grad_ref in zip(vjp(cotangent), vjp_ref(cotangent)):
    np.testing.assert_allclose(grad, grad_ref, atol=1e-5 * float(jnp.abs(grad_ref).max()))


def test_conv_valid_picks_the_kernel_of_the_platform_compiled_for():
  x = jnp.zeros((2, 8, 8, 1))
  kernel = jnp.zeros((3, 3, 1, 4))
  lowered = {platform: jax.jit(ops.conv_valid).trace(x, kernel).lower(
      lowering_platforms=(platform,)).as_text() for platform in ("cpu", "cuda")}
  assert "convolution" not in lowered["cpu"] and "dot_general" in lowered["cpu"]
  assert "convolution" in lowered["cuda"]


@pytest.mark.parametrize("shape, kernel_shape", [((3, 10, 9, 1), (5, 5, 1, 4)),
                                                 ((2, 9, 8, 3), (3, 3, 3, 5))])
def test_conv_matmuls_gradient_under_jit_and_in_bfloat16(shape, kernel_shape):
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), kernel_shape)

  def loss(conv, x, kernel):
    return jnp.sum(jnp.tanh(conv(x, kernel)))

  grads = jax.jit(jax.grad(functools.partial(loss, ops.conv_matmuls),
                           argnums=(0, 1)))(x, kernel)
  grads_ref = jax.grad(functools.partial(loss, _lax_conv), argnums=(0, 1))(x, kernel)
  for grad, grad_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(grad, grad_ref, atol=1e-4 * float(jnp.abs(grad_ref).max()))
  y16 = ops.conv_matmuls(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  grads16 = jax.grad(lambda x, k: jnp.sum(ops.conv_matmuls(x, k).astype(jnp.float32)),
                     argnums=(0, 1))(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert [g.dtype for g in grads16] == [jnp.bfloat16, jnp.bfloat16]


def _reduce_window_max(x):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def test_max_pool_equals_reduce_window_and_drops_partial_windows():
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))  # 9 rows: the last is dropped
  y = ops.max_pool_2d(x, 2)
  assert y.shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(y, _reduce_window_max(x))
  # Without ties the gradient goes to each window's maximum, as reduce_window's.
  grad = jax.grad(lambda x: ops.max_pool_2d(x, 2).sum())(x)
  grad_ref = jax.grad(lambda x: _reduce_window_max(x).sum())(x)
  np.testing.assert_array_equal(grad, grad_ref)


def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window_on_ties():
  # Ties (a ReLU's zeros, repeated values): reduce_window's gradient picks one
  # element per window; the reshaped max's automatic gradient would split it.
  x = jnp.array([[1., 1., 0., 2.], [1., 0., 2., 2.], [0., 0., 3., 0.],
                 [0., 0., 0., 3.]]).reshape(1, 4, 4, 1)
  cotangent = jnp.array([1., 2., 3., 4.]).reshape(1, 2, 2, 1)
  _, vjp = jax.vjp(lambda x: ops.max_pool_2d(x, 2), x)
  _, vjp_ref = jax.vjp(_reduce_window_max, x)
  np.testing.assert_array_equal(vjp(cotangent)[0], vjp_ref(cotangent)[0])
  assert float(vjp(cotangent)[0].sum()) == 10.0


def test_mnist_cnn_with_the_loop_convolution_matches_the_default_one():
  # Same parameters, same outputs: the experiments' models differ only in speed.
  x = jax.random.normal(jax.random.key(0), (4,) + MNIST)
  default = models.create_model("cnn", num_classes=10)
  looped = models.create_model("cnn", num_classes=10, conv=models.LoopConv)
  variables = _init(default, key=1)
  chex.assert_trees_all_equal(variables, _init(looped, key=1))
  y, _ = _train(default, variables, x)
  y_looped, _ = _train(looped, variables, x)
  chex.assert_trees_all_close(y_looped, y, atol=1e-5, rtol=1e-5)


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
  rows = models.parameter_table(resnet.ResNet50(num_classes=10), (64, 64, 3))
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


def test_resnet_on_28x28x1_trains_and_evaluates():
  model = _tiny_resnet(zero_init_last_bn=False)
  variables = _init(model)
  images = jax.random.uniform(jax.random.key(1), (4,) + MNIST)
  logits, updates = _train(model, variables, images)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])
  assert not np.allclose(updates["batch_stats"]["bn_init"]["mean"],
                         variables["batch_stats"]["bn_init"]["mean"])
  assert model.apply({"params": variables["params"], **updates}, images,
                     train=False).shape == (4, 10)
  half, half_updates = _train(model.clone(dtype=jnp.bfloat16), variables, images)
  assert half.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(half_updates))
  np.testing.assert_allclose(half, logits, atol=0.1 * float(jnp.abs(logits).max()))


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
  model = models.create_model("resnet20", num_classes=10, bias_before_bn=False,
                              bn_momentum=0.9, bn_epsilon=1e-5)
  assert isinstance(model, resnet.ResNet) and model.bn_momentum == 0.9
  rows = models.parameter_table(model, MNIST)
  assert sum(r.trainable for r in rows) == 269_722 - 288  # 1 input channel, not 3
  assert sum(r.non_trainable for r in rows) == 1376
  assert [r.layer for r in rows][:3] == ["conv_init", "bn_init", "BasicBlock_0"]
  assert "Non-trainable (BN running statistics): 1,376" in models.format_parameter_table(
      rows)
  with pytest.raises(ValueError, match="bias_before_bn=False"):
    models.create_model("resnet20", num_classes=10)
  with pytest.raises(ValueError, match="use_bn=True"):
    models.create_model("resnet20", num_classes=10, use_bn=False, bias_before_bn=False)


def test_resnet_rejects_bad_attributes():
  with pytest.raises(ValueError, match="stem must be 'cifar' or 'imagenet'"):
    _tiny_resnet().clone(stem="vit").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="NHWC"):
    _tiny_resnet().init(jax.random.key(0), jnp.zeros((8, 8, 1)))




@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_precise_bn_pools_batches_with_equal_weight(kind):
  if kind == "resnet":
    model, first = _tiny_resnet(zero_init_last_bn=False), "bn_init"
  else:
    model, first = models.MnistCNN(bias_before_bn=False), "bn1"
  variables = _init(model, (16, 16, 1))
  batches = [jax.random.uniform(jax.random.key(i), (8, 16, 16, 1)) + i for i in (1, 2)]
  new = jaxbn.linen.recompute_stats(model, variables, iter(batches + batches),
                                    num_batches=2, train=True)
  assert jax.tree.structure(new) == jax.tree.structure(variables)
  chex.assert_trees_all_equal(new["params"], variables["params"])
  # The first BN layer sees the same inputs in any batch split: its pooled
  # statistics are those of both batches together.
  together = jaxbn.linen.recompute_stats(model, variables, [jnp.concatenate(batches)],
                                         num_batches=1, train=True)
  stats, stats_together = new["batch_stats"][first], together["batch_stats"][first]
  np.testing.assert_allclose(stats["mean"], stats_together["mean"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], stats_together["var"], rtol=1e-4, atol=1e-6)
  assert not np.allclose(stats["mean"], variables["batch_stats"][first]["mean"])
  with pytest.raises(ValueError, match="needs 3 batches, got 2"):
    jaxbn.linen.recompute_stats(model, variables, iter(batches), num_batches=3, train=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_resnet_fused_bn_relu_equals_the_unfused_pair(dtype, monkeypatch):
  """With jaxbn's norm each BN + ReLU is one layer (`resnet.norm_relu`), with the
  backward pass GPUs get (forced here on CPU): same loss, gradients and running
  statistics as `nn.relu` after the layer."""
  from jaxbn import _activation
  monkeypatch.setattr(_activation, "_normalize_then_act",
                      _activation._normalize_act_saving_input)
  model = _tiny_resnet(zero_init_last_bn=False, dtype=dtype)
  images = jax.random.normal(jax.random.key(1), (8, 12, 12, 3))
  labels = jnp.arange(8) % 10
  variables = model.init(jax.random.key(0), images, train=False)

  def loss_and_grads():
    def loss(params):
      logits, updates = model.apply({**variables, "params": params}, images, train=True,
                                    mutable=["batch_stats"])
      one_hot = jax.nn.one_hot(labels, 10)
      return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * one_hot, -1)), updates
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  fused = loss_and_grads()
  monkeypatch.setattr(resnet, "norm_relu",
                      lambda norm, y, **kwargs: nn.relu(norm(**kwargs)(y)))
  unfused = loss_and_grads()
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  chex.assert_trees_all_close(fused, unfused, atol=tol, rtol=tol)
