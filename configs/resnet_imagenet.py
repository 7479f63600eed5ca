"""ResNet-50 (v1.5) on ImageNet, as flax's `examples/imagenet` TPU config.

Global batch 1024 over all devices, bfloat16 activations (float32 parameters,
optimizer and BN statistics), SGD with Nesterov momentum 0.9, peak learning
rate 0.1 x batch / 256 after 5 warmup epochs, cosine decay over 100 epochs,
L2 weight decay 1e-4, label smoothing available (off by default, as flax).

imagenet2012 needs the user's archives (ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar) in `--config.manual_dir` (tfds' manual download). The
last 1% of the training images is the validation split; the official
validation set (50k) is the test split (its test labels are not public).

Run (each host of a pod, or one machine):
`python train.py --config=configs/resnet_imagenet.py --workdir=gs://.../resnet50`.
"""

from configs import mnist_bn


def get_config():
  config = mnist_bn.get_config()
  config.dataset = "imagenet2012"
  config.train_split = "train[:99%]"
  config.validation_split = "train[99%:]"
  config.test_split = "validation"

  config.model = "resnet50"
  config.bias_before_bn = False
  config.bn_momentum = 0.9
  config.bn_epsilon = 1e-5
  config.half_precision = True

  config.batch_size = 1024
  config.eval_batch_size = 1024
  config.num_epochs = 100
  config.optimizer = "momentum"
  config.momentum = 0.9
  config.nesterov = True
  config.learning_rate = 0.1 * config.batch_size / 256
  config.weight_decay = 1e-4
  config.label_smoothing = 0.0
  config.lr_schedule = "cosine"
  config.warmup_epochs = 5.0

  config.checkpoint_every_steps = 1000
  config.log_every_steps = 100
  return config
