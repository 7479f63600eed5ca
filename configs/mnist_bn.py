"""Default config: the Keras MNIST CNN with batch normalization on MNIST.

Run: `python train.py --config=configs/mnist_bn.py --workdir=runs/mnist_bn`.
Every field can be overridden from the command line: `--config.batch_size=256`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The base config; the other configs import it and change what differs."""
  config = ml_collections.ConfigDict()

  # Data.
  # 'mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012',
  # 'synthetic' (random images, no files) or another tfds image classification
  # dataset.
  config.dataset = "mnist"
  # Folder with the dataset's original archives; '' = data/<dataset> in the
  # repo if it exists, else tfds downloads them (imagenet2012: the ILSVRC tars).
  config.manual_dir = ""
  # Where tfds prepares datasets (a cache); '' = $TFDS_DATA_DIR or data/tfds.
  config.data_dir = ""
  # tfds split strings; '' = the dataset's default (mnist: the notes' Keras run's 50k
  # train / 10k validation / 10k test; cifar: 45k / 5k / test; imagenet2012:
  # train[:99%] / train[99%:] / validation).
  config.train_split = ""
  config.validation_split = ""
  config.test_split = ""
  # Use only the first N training examples; 0 = all.
  config.num_train_examples = 0
  # Evaluate on only the first N validation and test examples; 0 = all.
  config.num_eval_examples = 0
  # Training augmentation: 'auto' (cifar for CIFAR, imagenet for imagenet2012,
  # none otherwise), 'none', 'cifar' (pad 4, random crop, flip) or 'imagenet'
  # (random resized crop, flip).
  config.augmentation = "auto"
  # Side of the model's square input; 0 = the dataset's (224 for imagenet2012,
  # 32 for synthetic).
  config.image_size = 0
  # Classes of synthetic data; 0 = the dataset's (10 for synthetic).
  config.num_classes = 0

  # Model.
  # 'cnn' (the Keras MNIST CNN), 'mlp' (the BN paper's 3x100 sigmoid MLP),
  # 'resnet20' / 'resnet32' / 'resnet56' (CIFAR-style) or 'resnet18' /
  # 'resnet34' / 'resnet50' (ImageNet-style v1.5): training/resnet.py.
  config.model = "cnn"
  config.use_bn = True
  # Keep the conv/dense bias in front of each BN (the notes' Keras model does;
  # BN's beta makes it redundant).
  config.bias_before_bn = True
  # Keras' BatchNormalization defaults, as in the notes' Keras model.
  config.bn_momentum = 0.99
  config.bn_epsilon = 1e-3
  # ResNets: zero scale on the last BN of each residual branch (Goyal et al.
  # 2017), so every block starts as the identity.
  config.zero_init_last_bn = True
  # PreciseBN: before each evaluation and checkpoint, recompute the BN running
  # statistics as the population statistics of this many training batches
  # (with the current weights; jaxbn.recompute_stats); 0 = off (the EMA).
  config.precise_bn_batches = 0
  # bfloat16 activations and matmuls; params, optimizer and BN state float32.
  config.half_precision = False

  # Optimization.
  config.batch_size = 128  # global, over all devices and processes
  # Gradient accumulation: each device's batch_size / num_devices examples run as
  # this many microbatches one after the other (a lax.scan), so a step holds the
  # activations of one microbatch; their mean gradient is applied once (one
  # optimizer step per batch). BN normalizes each microbatch with its own
  # statistics and updates the running statistics once, with the moments of the
  # whole batch. 1 = off.
  config.grad_accum_steps = 1
  # Global. On CPU the convolutions' patch matrices of 250 images stay in
  # cache, which makes evaluation faster than at larger batches (measured by
  # `python -m benchmarks.cpu_paths`); the metrics do not depend on it.
  config.eval_batch_size = 250
  config.num_epochs = 3
  config.optimizer = "adam"  # 'sgd', 'momentum' or 'adam'
  config.learning_rate = 0.01  # peak value of the schedule
  config.momentum = 0.9  # for optimizer='momentum'
  config.nesterov = False  # Nesterov momentum, for optimizer='momentum'
  # Applies to kernels only (leaves with ndim > 1; not biases or BN scales and
  # offsets, as flax's ImageNet example). 'adam': decoupled (AdamW); 'sgd' /
  # 'momentum': L2, i.e. weight_decay * w added to the gradient before momentum
  # (as the ResNet papers).
  config.weight_decay = 0.0
  # Training targets (1 - s) * one_hot + s / num_classes; 0 = off.
  config.label_smoothing = 0.0
  # 'constant', 'cosine' (linear warmup, cosine decay to 0) or 'onecycle'.
  config.lr_schedule = "onecycle"
  config.warmup_epochs = 0.3  # warmup of 'cosine'; rise phase of 'onecycle'
  config.seed = 0  # parameter init and data order

  # Parallelism.
  # 'gspmd': jax.jit over a ('data',) mesh, batch sharded, state replicated.
  # 'shard_map': the step inside jax.shard_map, BN over axis_name='data'.
  config.parallelism = "gspmd"
  config.num_devices = 0  # use the first N devices (single process); 0 = all
  # BN statistics over groups of this many devices (shard_map); 0 = all.
  config.bn_group_size = 0

  # Checkpoints, logging, reliability.
  config.checkpoint_every_steps = 200  # also saved at the end of every epoch
  config.max_checkpoints_to_keep = 2
  # Every this many steps: TensorBoard's step metrics (train/loss, learning
  # rate, images/s) and, without a terminal's progress bar, one log line.
  config.log_every_steps = 20
  # TensorBoard event files in <workdir>/tensorboard (process 0).
  config.tensorboard = True
  # Evaluate the test split after every epoch too (by default only after the
  # last: choose the model on validation, look at the test split once).
  config.evaluate_test_every_epoch = False
  # Steps with a non-finite loss or gradient are skipped; this many in a row
  # stop the run.
  config.max_consecutive_nonfinite = 20
  # On SIGTERM (SLURM, TPU preemption) all processes agree, at the next step
  # that is a multiple of this, to save a checkpoint there and exit (code 75).
  config.preemption_check_every_steps = 10
  # After SIGTERM, at most this many seconds to save and exit; past it the
  # process prints every thread's stack and exits with status 1 (a run stuck
  # in a collective whose peer is gone never reaches the next check). Below
  # the scheduler's SIGTERM-to-SIGKILL wait: SLURM's KillWait, often 30 s.
  config.sigterm_grace_seconds = 25.0
  # A run whose steps (or evaluation batches, or checkpoint saves) stop for
  # this long prints every thread's stack and exits with status 1; 0 = off.
  # Compilation does not count.
  config.stall_timeout_seconds = 1800.0
  # tf.data threads that decode and augment images, one core each
  # (0 = all host cores); the batches are the same for any number.
  config.data_workers = 0

  return config
