"""A tiny run for tests: MNIST CNN on 512 MNIST examples, 2 short epochs.

Two choices make runs comparable across topologies and cheap to repeat:
no bias before BN (its true gradient is 0, so Adam turns the rounding noise
of its gradient into lr-sized steps that differ between topologies; training
outputs are invariant to that bias, running means are not), and a constant
learning rate (the compiled step does not depend on `num_epochs`, so runs of
different lengths share JAX's compilation cache).
"""

from configs import mnist_bn


def get_config():
  config = mnist_bn.get_config()
  config.num_train_examples = 512
  config.num_eval_examples = 128
  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_epochs = 2
  config.bias_before_bn = False
  config.learning_rate = 0.003
  config.lr_schedule = "constant"
  config.checkpoint_every_steps = 3
  config.log_every_steps = 2
  return config
