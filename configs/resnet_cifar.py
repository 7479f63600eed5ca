"""ResNet-20 on CIFAR-10 (He et al. 2016, section 4.2), with jaxbn batch norm.

SGD with momentum 0.9, batch 128, L2 weight decay 1e-4, peak learning rate
0.1, no conv bias before BN; a linear warmup and cosine decay replace the
paper's steps at 32k and 48k of its 64k iterations (182 epochs of 45k
training images; the remaining 5k are the validation split).

Run: `python train.py --config=configs/resnet_cifar.py --workdir=runs/resnet20`.
Deeper: `--config.model=resnet56`. On MNIST (the dataset that ships):
`--config.dataset=mnist` (see docs/train.md for the 2-epoch run).
"""

from configs import mnist_bn


def get_config():
  config = mnist_bn.get_config()
  config.dataset = "cifar10"
  # Splits stay '' (the dataset's defaults): cifar10 45k/5k/test as the paper,
  # mnist 50k/10k/test with --config.dataset=mnist.

  config.model = "resnet20"
  config.bias_before_bn = False
  # As the paper: every BN scale starts at 1. (Zero-initialized last scales
  # make every block start as the identity; in a 2-epoch MNIST run that
  # slowed the first hundred steps down markedly.)
  config.zero_init_last_bn = False
  # PyTorch's / flax's ResNet batch-norm settings (PyTorch momentum 0.1).
  config.bn_momentum = 0.9
  config.bn_epsilon = 1e-5

  config.batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 182
  config.optimizer = "momentum"
  config.momentum = 0.9
  config.learning_rate = 0.1
  config.weight_decay = 1e-4
  config.lr_schedule = "cosine"
  config.warmup_epochs = 1.0

  config.checkpoint_every_steps = 1000
  config.log_every_steps = 50
  return config
