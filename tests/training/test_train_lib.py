"""training.train_lib in one process: topologies, non-finite steps, outputs, configs.

Runs use configs/tiny.py (512 MNIST examples, batch 64, 8 steps per epoch,
no bias before BN) on the 8 virtual CPU devices of conftest. Tests of logic
that does not depend on the model use the smaller BN MLP, which compiles
faster.
"""

import functools
import importlib
import json
import shutil
import signal
import subprocess
import sys

import chex
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxbn
from tests.training import _train_utils as utils
from training import checkpoints
from training import datasets
from training import distributed
from training import evaluation
from training import input_pipeline
from training import models
from training import monitoring
from training import optimizers
from training import prepare
from training import run_config
from training import steps
from training import stopping
from training import train_lib
from training import train_state


@functools.cache
def _mnist_tiny():
  splits, info = datasets.load_dataset("mnist", ["train[:50000]"])
  return splits["train[:50000]"].take(512), info


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  """The reference: 1 device, gspmd; also used for the output checks."""
  workdir = tmp_path_factory.mktemp("one_device")
  config = utils.tiny_config(num_devices=1)
  final = train_lib.train_and_evaluate(config, workdir)
  return workdir, final


@pytest.mark.parametrize("parallelism", ["gspmd", "shard_map"])
def test_eight_devices_give_the_one_device_curve(parallelism, one_device_run, tmp_path):
  reference_dir, _ = one_device_run
  config = utils.tiny_config(parallelism=parallelism)
  train_lib.train_and_evaluate(config, tmp_path)
  utils.assert_same_curve(utils.read_metrics(tmp_path), utils.read_metrics(reference_dir))


def test_outputs_in_workdir(one_device_run):
  workdir, final = one_device_run
  records = utils.read_metrics(workdir)
  assert [r["epoch"] for r in records] == [1, 2] and records[-1] == final
  for key in ("epoch", "step", "train_loss", "train_accuracy", "val_loss",
              "val_accuracy", "test_loss", "test_accuracy", "examples_per_sec"):
    assert key in final
  # The test split is evaluated after the last epoch only.
  assert "test_accuracy" not in records[0] and "val_accuracy" in records[0]
  # TensorBoard: step metrics every log_every_steps (2) and the epoch metrics.
  tags = _tensorboard_scalars(workdir / monitoring.TENSORBOARD_DIR)
  assert sorted(tags["train/loss"]) == list(range(2, 17, 2))
  np.testing.assert_allclose(list(tags["train/learning_rate"].values()), 0.003)
  assert sorted(tags["epoch/val_accuracy"]) == [8, 16]
  assert tags["epoch/val_accuracy"][16] == pytest.approx(final["val_accuracy"])
  assert sorted(tags["epoch/test_accuracy"]) == [16]
  assert final["step"] == 16 and final["examples_per_sec"] > 0
  assert all(np.isfinite(r["train_loss"]) and r["train_loss"] < 2.5 for r in records)
  assert records[1]["train_loss"] < records[0]["train_loss"]
  assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((workdir / "config.json").read_text())["batch_size"] == 64
  # The epoch-end checkpoint holds the data position.
  manager = checkpoints.create_checkpoint_manager(workdir, utils.tiny_config())
  assert manager.latest_step() == 16
  progress = manager.restore(16, args=ocp.args.Composite(
      progress=ocp.args.JsonRestore())).progress
  assert (progress["epoch"], progress["batch_in_epoch"]) == (2, 0)
  manager.close()


def test_tensorboard_thread_imports_tensorflow_but_not_tfds(tmp_path):
  """tfds's import replaces `builtins.__import__` for every thread while it runs
  (etils' lazy imports), so the writer's background thread must not import it
  next to orbax's checkpoint threads (a save failed so in CI)."""
  script = (
      "import sys\n"
      "from training import monitoring\n"
      f"writer = monitoring.SummaryWriter({str(tmp_path)!r})\n"
      "writer.scalars(1, {'train/loss': 0.5})\n"
      "writer.close()\n"
      "assert 'tensorflow' in sys.modules\n"
      "assert 'tensorflow_datasets' not in sys.modules, 'the writer imported tfds'\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=utils.REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert _tensorboard_scalars(tmp_path) == {"train/loss": {1: 0.5}}


def _tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the event files in `logdir`."""
  tf, _ = prepare.import_tf()
  from tensorflow.core.util import event_pb2
  scalars = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        assert value.metadata.plugin_data.plugin_name == "scalars"
        scalars.setdefault(value.tag, {})[event.step] = float(
            tf.make_ndarray(value.tensor))
  return scalars


def test_rerun_resumes_and_ignores_half_written_checkpoints(one_device_run, tmp_path):
  reference_dir, final = one_device_run
  workdir = tmp_path / "run"
  shutil.copytree(reference_dir, workdir)
  checkpoints = workdir / "checkpoints"
  # What a save killed halfway leaves behind: a temporary directory with a
  # truncated state. It must never be restored.
  partial = checkpoints / "99.orbax-checkpoint-tmp-1234567"
  shutil.copytree(checkpoints / "16", partial)
  for path in partial.rglob("*"):
    if path.is_file():
      path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
  config = utils.tiny_config(num_devices=1)
  again = train_lib.train_and_evaluate(config, workdir)
  assert again == final  # restored at step 16: nothing left to train
  assert utils.read_metrics(workdir) == utils.read_metrics(reference_dir)
  # More epochs continue from the checkpoint instead of starting over.
  config.num_epochs = 3
  longer = train_lib.train_and_evaluate(config, workdir)
  assert longer["epoch"] == 3 and longer["step"] == 24
  assert utils.read_metrics(workdir)[:2] == utils.read_metrics(reference_dir)


def test_resume_refuses_a_different_run(one_device_run, tmp_path):
  reference_dir, _ = one_device_run
  shutil.copytree(reference_dir, tmp_path / "run")
  config = utils.tiny_config(num_devices=1, batch_size=32)
  with pytest.raises(ValueError, match=r"different run .*batch_size=64 there, 32 here"):
    train_lib.train_and_evaluate(config, tmp_path / "run")
  # Another model: caught by the same check before orbax compares the state trees.
  config = utils.tiny_config(num_devices=1, model="mlp")
  with pytest.raises(ValueError, match=r"model='cnn' there, 'mlp' here"):
    train_lib.train_and_evaluate(config, tmp_path / "run")
  # Every field that changes the run, with how to start fresh.
  config = utils.tiny_config(num_devices=1, learning_rate=0.01, lr_schedule="cosine",
                             bn_momentum=0.9, half_precision=True)
  with pytest.raises(ValueError, match=r"bn_momentum=0\.99 there, 0\.9 here; "
                     r"half_precision=False there, True here; learning_rate=0\.003 there, "
                     r"0\.01 here; lr_schedule='constant' there, 'cosine' here; "
                     r"num_epochs=None there, 2 here; .*use a new --workdir"):
    train_lib.train_and_evaluate(config, tmp_path / "run")
  # What may change: the number of epochs of a constant rate, devices, logging.
  config = utils.tiny_config(num_devices=2, num_epochs=3, log_every_steps=1)
  assert len(utils.read_metrics(tmp_path / "run")) == 2
  train_lib.train_and_evaluate(config, tmp_path / "run")
  assert len(utils.read_metrics(tmp_path / "run")) == 3


def _state_and_step(config, num_devices=8):
  train, info = _mnist_tiny()
  mesh = distributed.create_mesh(num_devices)
  model = train_state.create_model(config, info)
  tx = optimizers.create_optimizer(config, 8)
  state = jax.jit(functools.partial(train_state.create_train_state, model, tx,
                                    input_shape=info.image_shape),
                  out_shardings=NamedSharding(mesh, P()))(jax.random.key(0))
  step = steps.make_train_step(config, mesh, model, tx)
  batch = next(input_pipeline.train_batches(train, global_batch_size=config.batch_size,
                                            seed=0, epoch=0, rows=slice(None)))
  return state, step, batch, model, mesh


def _normalized(batch, config):
  """The model input of `batch` (what the steps compute on the device)."""
  return input_pipeline.normalize(batch.images, steps.dataset_preprocessing(config))


def _poison_inputs(monkeypatch, poison):
  """Train steps built afterwards compute on `poison(state, normalized images)`.

  The NaN enters where a corrupt input would, right after the on-device
  normalization, in the step function the training loop really runs.
  """
  normalize, train_step = input_pipeline.normalize, steps.train_step

  def poisoned_train_step(state, batch, **kwargs):
    def poisoned_normalize(images, preprocessing):
      return poison(state, normalize(images, preprocessing))

    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(input_pipeline, "normalize", poisoned_normalize)
      return train_step(state, batch, **kwargs)

  monkeypatch.setattr(steps, "train_step", poisoned_train_step)


def _poison_steps(monkeypatch, steps):
  """Every model input of the given 0-based global steps becomes NaN."""
  _poison_inputs(monkeypatch, lambda state, images: jnp.where(
      jnp.isin(state.step, jnp.asarray(steps)), jnp.nan, images))


@pytest.mark.parametrize("parallelism", ["gspmd", "shard_map"])
def test_nonfinite_step_changes_nothing_but_the_counters(parallelism, monkeypatch):
  config = utils.tiny_config(parallelism=parallelism, model="mlp")
  state, step, batch, model, mesh = _state_and_step(config)
  sharding = NamedSharding(mesh, P("data"))
  batch = input_pipeline.to_global(batch, sharding, 64)
  state = step(state, batch)  # one good step
  before = jax.device_get(state)
  # A single NaN input pixel (per device under shard_map) poisons the step.
  _poison_inputs(monkeypatch, lambda state, images: images.at[3, 10, 10, 0].set(jnp.nan))
  poisoned_step = steps.make_train_step(config, mesh, model,
                                        optimizers.create_optimizer(config, 8))
  after = jax.device_get(poisoned_step(state, batch))
  for name in ("params", "opt_state", "bn_state"):
    chex.assert_trees_all_equal(getattr(after, name), getattr(before, name))
  assert int(after.step) == 2 and int(after.consecutive_nonfinite) == 1
  assert int(after.epoch_sums.nonfinite_steps) == 1
  assert int(after.epoch_sums.steps) == int(before.epoch_sums.steps) == 1
  assert after.epoch_sums.loss == before.epoch_sums.loss


def test_injected_nan_batch_is_skipped_and_counted(tmp_path, monkeypatch):
  _poison_steps(monkeypatch, (3, 12))
  config = utils.tiny_config(num_devices=1, model="mlp")
  final = train_lib.train_and_evaluate(config, tmp_path)
  records = utils.read_metrics(tmp_path)
  assert [r["nonfinite_steps"] for r in records] == [1, 1]
  assert all(np.isfinite(value) for r in utils.compared(records) for value in r.values())
  assert final["train_accuracy"] > 0.5
  # Neither the saved state nor its running statistics took the NaN in.
  manager = checkpoints.create_checkpoint_manager(tmp_path, config)
  saved = manager.restore(16, args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state
  manager.close()
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(saved))


def test_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
  _poison_steps(monkeypatch, tuple(range(2, 16)))
  config = utils.tiny_config(num_devices=1, model="mlp", max_consecutive_nonfinite=4)
  with pytest.raises(FloatingPointError, match=r"4 training steps in a row .*non-finite"):
    train_lib.train_and_evaluate(config, tmp_path)
  # It stopped at the first check after 4 poisoned steps in a row (steps 2-5;
  # checked every log_every_steps=2 steps), keeping the last checkpoint's state.
  manager = checkpoints.create_checkpoint_manager(tmp_path, config)
  assert manager.latest_step() == 3
  saved = manager.restore(3, args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state
  manager.close()
  assert int(saved["consecutive_nonfinite"]) == 1  # step 2 was skipped
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(saved))


def test_bn_groups_pool_statistics_per_group():
  # 8 devices in 2 groups of 4: each group normalizes its 32 examples alone.
  # Momentum 0: the running statistics are the groups' batch statistics, which
  # differ enough for the pooled variance to differ from a plain average.
  config = utils.tiny_config(parallelism="shard_map", bn_group_size=4, bn_momentum=0.0)
  state, step, batch, model, mesh = _state_and_step(config)
  params, bn_state = jax.device_get((state.params, state.bn_state))
  new_state = jax.device_get(step(state, input_pipeline.to_global(
      batch, NamedSharding(mesh, P("data")), 64)))
  losses, group_states = [], []
  for group in (slice(0, 32), slice(32, 64)):
    logits, updates = model.apply({"params": params, "batch_stats": bn_state},
                                  _normalized(batch, config)[group], train=True,
                                  mutable=["batch_stats"])
    losses.append(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch.labels[group]).mean())
    group_states.append(updates["batch_stats"])
  np.testing.assert_allclose(new_state.epoch_sums.loss, np.mean(losses), rtol=1e-5)
  # The running statistics are the groups' pooled ones, identical on every
  # device: mean of the means; mean of the variances plus variance of the means.
  means = np.stack([g["bn2"]["mean"] for g in group_states])
  variances = np.stack([g["bn2"]["var"] for g in group_states])
  np.testing.assert_allclose(new_state.bn_state["bn2"]["mean"], means.mean(0),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new_state.bn_state["bn2"]["var"],
                             variances.mean(0) + means.var(0), rtol=1e-5, atol=1e-7)
  assert np.any(means.var(0) > 1e-6)  # the groups differ: the check can fail
  global_logits, _ = model.apply({"params": params, "batch_stats": bn_state},
                                 _normalized(batch, config), train=True,
                                 mutable=["batch_stats"])
  global_loss = optax.softmax_cross_entropy_with_integer_labels(
      global_logits, batch.labels).mean()
  assert abs(float(global_loss) - float(new_state.epoch_sums.loss)) > 1e-4


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=60), r"batch_size=60 must be a positive multiple of the number "
                          r"of devices \(8\)"),
    (dict(eval_batch_size=0), "eval_batch_size must be > 0"),
    (dict(model="resnet"), "unknown model 'resnet'"),
    (dict(optimizer="adagrad"), "unknown optimizer 'adagrad'"),
    (dict(lr_schedule="step"), "unknown lr_schedule 'step'"),
    (dict(parallelism="pmap"), "unknown parallelism 'pmap'"),
    (dict(parallelism="shard_map", bn_group_size=3), r"bn_group_size=3 must be 0 .* "
                                                      r"divide the number of devices"),
    (dict(bn_group_size=4), "bn_group_size needs parallelism='shard_map'"),
    (dict(num_devices=9), r"num_devices must be in \[0, 8\]"),
    (dict(model="resnet20", bias_before_bn=True),
     r"set use_bn=True and bias_before_bn=False"),
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    (dict(nesterov=True), "nesterov=True needs optimizer='momentum'"),
    (dict(precise_bn_batches=-1), "precise_bn_batches must be >= 0"),
    (dict(precise_bn_batches=9, num_devices=1), r"precise_bn_batches=9 is more than "
                                                r"the 8 training batches per epoch"),
    (dict(preemption_check_every_steps=0), "preemption_check_every_steps must be >= 1"),
])
def test_bad_configs_fail_at_start(overrides, message, tmp_path):
  config = utils.tiny_config(**overrides)
  with pytest.raises(ValueError, match=message):
    train_lib.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_unknown_dataset_fails_at_start(tmp_path):
  config = utils.tiny_config(dataset="not_a_dataset", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="unknown dataset 'not_a_dataset'"):
    train_lib.train_and_evaluate(config, tmp_path)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_optimizers_and_schedules(name, schedule):
  config = utils.tiny_config(optimizer=name, lr_schedule=schedule, learning_rate=0.1)
  tx = optimizers.create_optimizer(config, steps_per_epoch=8)
  lr = optimizers.create_learning_rate_schedule(config, 8)
  params = grads = {"w": jnp.ones(3)}
  opt_state = tx.init(params)
  # The warm-up of 'cosine' starts at 0 (a zero update); the steps after it must
  # move against the gradient, and sgd by exactly lr * gradient.
  for step in range(3):
    updates, opt_state = tx.update(grads, opt_state, params)
    update = np.asarray(updates["w"])
    if float(lr(step)) == 0:
      np.testing.assert_array_equal(update, 0)
    else:
      assert np.all(update < 0), (step, update)
    if name == "sgd":
      np.testing.assert_allclose(update, -float(lr(step)), rtol=1e-6)
  assert float(lr(2)) > 0
  peak = max(float(lr(i)) for i in range(16))
  np.testing.assert_allclose(peak, 0.1, rtol=0.05)
  if schedule != "constant":
    assert float(lr(16)) < 0.01


def test_half_precision_trains_with_float32_state():
  config = utils.tiny_config(half_precision=True, num_devices=1, model="mlp")
  state, step, batch, _, mesh = _state_and_step(config, num_devices=1)
  sharding = NamedSharding(mesh, P("data"))
  for _ in range(2):
    state = step(state, input_pipeline.to_global(batch, sharding, 64))
  state = jax.device_get(state)
  assert int(state.epoch_sums.steps) == 2 and np.isfinite(state.epoch_sums.loss)
  for leaf in jax.tree.leaves((state.params, state.opt_state, state.bn_state)):
    assert leaf.dtype in (np.float32, np.int32), leaf.dtype


def test_nesterov_and_l2_weight_decay_of_kernels_before_momentum():
  config = utils.tiny_config(optimizer="momentum", nesterov=True, weight_decay=1e-2,
                             learning_rate=0.1)
  tx = optimizers.create_optimizer(config, steps_per_epoch=8)
  expected = optax.sgd(0.1, momentum=0.9, nesterov=True)
  params = {"kernel": jnp.array([[1.0, -2.0, 3.0]]), "bias": jnp.array([1.0, -2.0, 3.0])}
  grads = {"kernel": jnp.array([[0.5, 0.5, -1.0]]), "bias": jnp.array([0.5, 0.5, -1.0])}
  # As flax's ImageNet example: the kernel's gradient gains weight_decay * w; a
  # bias (or BN scale, ndim 1) is not decayed.
  decayed = {"kernel": grads["kernel"] + 1e-2 * params["kernel"], "bias": grads["bias"]}
  state, expected_state = tx.init(params), expected.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    expected_updates, expected_state = expected.update(decayed, expected_state, params)
    chex.assert_trees_all_close(updates, expected_updates, rtol=1e-6)
  adamw = optimizers.create_optimizer(utils.tiny_config(weight_decay=0.1), 8)
  updates, _ = adamw.update(grads, adamw.init(params), params)
  plain = optax.adam(0.003)
  plain_updates, _ = plain.update(grads, plain.init(params), params)
  np.testing.assert_allclose(updates["bias"], plain_updates["bias"], rtol=1e-6)
  assert not np.allclose(updates["kernel"], plain_updates["kernel"])


def test_label_smoothing_trains_on_smoothed_targets():
  config = utils.tiny_config(num_devices=1, model="mlp", label_smoothing=0.2)
  state, step, batch, model, mesh = _state_and_step(config, num_devices=1)
  params, bn_state = jax.device_get((state.params, state.bn_state))
  new_state = jax.device_get(step(state, input_pipeline.to_global(
      batch, NamedSharding(mesh, P("data")), 64)))
  logits, _ = model.apply({"params": params, "batch_stats": bn_state},
                          _normalized(batch, config), train=True, mutable=["batch_stats"])
  targets = 0.8 * jax.nn.one_hot(batch.labels, 10) + 0.2 / 10
  expected = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1))
  np.testing.assert_allclose(new_state.epoch_sums.loss, expected, rtol=1e-5)
  plain = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels).mean()
  assert abs(float(plain) - float(expected)) > 1e-3


def test_precise_bn_recomputes_the_statistics_before_evaluation_and_saving(tmp_path):
  config = utils.tiny_config(num_devices=1, model="mlp", precise_bn_batches=3,
                             num_epochs=1, checkpoint_every_steps=0)
  train_lib.train_and_evaluate(config, tmp_path / "precise")
  ema = utils.tiny_config(num_devices=1, model="mlp", num_epochs=1,
                          checkpoint_every_steps=0)
  train_lib.train_and_evaluate(ema, tmp_path / "ema")
  precise_record = utils.read_metrics(tmp_path / "precise")[0]
  ema_record = utils.read_metrics(tmp_path / "ema")[0]
  # Training is the same; only the statistics used by evaluation differ.
  assert precise_record["train_loss"] == ema_record["train_loss"]
  assert precise_record["val_loss"] != ema_record["val_loss"]
  # The saved statistics are those of the first 3 batches of the epoch, pooled.
  train, info = _mnist_tiny()
  model = train_state.create_model(config, info)
  abstract = jax.eval_shape(functools.partial(
      train_state.create_train_state, model, optimizers.create_optimizer(config, 8),
      input_shape=info.image_shape), jax.random.key(0))
  manager = checkpoints.create_checkpoint_manager(tmp_path / "precise", config)
  saved = manager.restore(8, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract))).state
  manager.close()
  batches = [_normalized(batch, config) for batch in input_pipeline.train_batches(
      train, global_batch_size=64, seed=0, epoch=0, rows=slice(None))]
  # Three batches of 64 examples each weigh the same: the first BN layer's
  # statistics are those of the 192 examples.
  expected = jaxbn.linen.recompute_stats(
      model, {"params": saved.params, "batch_stats": saved.bn_state},
      [np.concatenate(batches[:3])], num_batches=1, train=True)["batch_stats"]
  np.testing.assert_allclose(saved.bn_state["bn1"]["mean"], expected["bn1"]["mean"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(saved.bn_state["bn1"]["var"], expected["bn1"]["var"],
                             rtol=1e-4, atol=1e-6)


def test_checkpoints_with_jaxbn_batch_norm_states_restore(tmp_path):
  # The MNIST models' checkpoints from before they were linen modules: a
  # jaxbn.BatchNormParams / BatchNormState per BN layer, with an update count.
  config = utils.tiny_config(num_devices=1)
  model = train_state.create_model(config, _mnist_tiny()[1])
  state = jax.jit(functools.partial(
      train_state.create_train_state, model, optimizers.create_optimizer(config, 8),
      input_shape=(28, 28, 1)))(jax.random.key(0))
  state = state._replace(bn_state=jax.tree.map(lambda x: x + 0.5, state.bn_state))

  def old_params(tree):
    return {name: jaxbn.BatchNormParams(**layer) if name.startswith("bn") else layer
            for name, layer in tree.items()}

  old = state._replace(
      params=old_params(state.params),
      opt_state=jax.tree.map(lambda node: old_params(node) if isinstance(node, dict) else node,
                             state.opt_state, is_leaf=lambda node: isinstance(node, dict)),
      bn_state={name: jaxbn.BatchNormState(layer["mean"], layer["var"], jnp.int32(7))
                for name, layer in state.bn_state.items()})
  manager = checkpoints.create_checkpoint_manager(tmp_path, config)
  checkpoints.save_checkpoint(manager, old, {"step": 3})
  manager.wait_until_finished()
  restored, progress = checkpoints.restore_checkpoint(manager, jax.eval_shape(lambda: state))
  manager.close()
  assert progress == {"step": 3}
  chex.assert_trees_all_equal(restored, state)


class _SigtermAtSecondCheck(stopping.StopRequest):
  """Delivers a real SIGTERM to this process just before the second check."""
  checks = 0

  def agreed(self, state=None):
    type(self).checks += 1
    if type(self).checks == 2:
      signal.raise_signal(signal.SIGTERM)
    return super().agreed(state)


def test_sigterm_saves_a_checkpoint_and_the_rerun_ends_as_uninterrupted(
    one_device_run, tmp_path, monkeypatch):
  reference_dir, final = one_device_run
  monkeypatch.setattr(stopping, "StopRequest", _SigtermAtSecondCheck)
  previous_handler = signal.getsignal(signal.SIGTERM)
  config = utils.tiny_config(num_devices=1, preemption_check_every_steps=2)
  with pytest.raises(stopping.Preempted, match="checkpoint saved at step 4") as caught:
    train_lib.train_and_evaluate(config, tmp_path)
  assert caught.value.step == 4
  assert signal.getsignal(signal.SIGTERM) is previous_handler  # handler restored
  manager = checkpoints.create_checkpoint_manager(tmp_path, config)
  assert manager.latest_step() == 4  # not a periodic step (every 3)
  manager.close()
  monkeypatch.undo()
  again = train_lib.train_and_evaluate(config, tmp_path)
  assert utils.compared([again]) == utils.compared([final])
  assert (utils.compared(utils.read_metrics(tmp_path))
          == utils.compared(utils.read_metrics(reference_dir)))


def test_resnet_trains_under_shard_map_with_precise_bn(tmp_path):
  config = utils.tiny_config(model="resnet20", bn_momentum=0.9, bn_epsilon=1e-5,
                             parallelism="shard_map", num_epochs=1, batch_size=32,
                             eval_batch_size=64, num_train_examples=64,
                             precise_bn_batches=2, optimizer="momentum",
                             learning_rate=0.05, weight_decay=1e-4, label_smoothing=0.1)
  final = train_lib.train_and_evaluate(config, tmp_path)
  assert final["step"] == 2 and np.isfinite(final["train_loss"])
  assert 0.0 <= final["test_accuracy"] <= 1.0


@pytest.mark.parametrize("eval_batch_size", [250, 7, 1000])
def test_evaluation_on_8_devices_counts_every_example_once_as_on_1(eval_batch_size):
  # 1001 examples: an uneven last batch; eval batches that are not multiples of 8.
  model = models.MnistCNN()
  state = train_state.create_train_state(model, optax.sgd(0.1), jax.random.key(0),
                                         input_shape=(28, 28, 1))
  # Non-trivial running statistics, so that the BN layers matter.
  state = state._replace(bn_state=jax.tree.map(lambda x: x + 0.3, state.bn_state))
  rng = np.random.default_rng(0)
  split = datasets.Split(rng.integers(0, 256, (1001, 28, 28, 1), dtype=np.uint8),
                         rng.integers(0, 10, 1001).astype(np.int32))
  config = utils.tiny_config()
  results = {}
  for num_devices in (1, 8):
    mesh = distributed.create_mesh(num_devices)
    eval_fn = steps.make_eval_step(config, mesh, model)
    for chained in (False, True):
      results[num_devices, chained] = evaluation.evaluate(
          eval_fn, state, split, global_batch_size=eval_batch_size, mesh=mesh,
          chained=chained)
  logits = model.apply({"params": state.params, "batch_stats": state.bn_state},
                       input_pipeline.normalize(split.images, split.preprocessing),
                       train=False)
  expected_accuracy = int(np.sum(np.argmax(logits, -1) == split.labels)) / 1001
  expected_loss = float(np.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, split.labels)))
  for result in results.values():
    assert result["accuracy"] == expected_accuracy
    np.testing.assert_allclose(result["loss"], expected_loss, rtol=1e-5)
  assert results[1, False]["accuracy"] == results[8, False]["accuracy"]
  np.testing.assert_allclose(results[1, False]["loss"], results[8, False]["loss"], rtol=1e-6)


@pytest.mark.parametrize("config_name", ["mnist_bn", "resnet_cifar", "resnet_imagenet"])
def test_the_shipped_configs_are_valid_on_8_devices(config_name):
  config = importlib.import_module(f"configs.{config_name}").get_config()
  run_config.validate_config(config, 8)
  assert evaluation.eval_batch_rows(config.eval_batch_size, 8) % 8 == 0


_SRUN_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("environ, flags, expected, reason", [
    ({}, {}, False, "single process (no --coordinator_address"),
    # salloc shell: an allocation but no job step; jax's detection would fail.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, {}, False, "SLURM allocation without"),
    ({**_SRUN_STEP, "SLURM_NTASKS": "1"}, {}, False, "SLURM allocation without"),
    (_SRUN_STEP, {}, True, "SLURM job step of 2 tasks"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, {}, True, "TPU slice of 4 hosts"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, {}, False, "single process"),
    ({}, {"coordinator_address": "h:1234"}, True, "--coordinator_address=h:1234"),
    (_SRUN_STEP, {"distributed": False}, False, "--distributed=False"),
    ({}, {"distributed": True}, True, "--distributed=True"),
])
def test_multi_process_launch_is_detected_only_when_real(environ, flags, expected, reason):
  initialize, why = distributed.multi_process_launch(environ, **flags)
  assert initialize is expected
  assert reason in why
