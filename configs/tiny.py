"""A tiny run for tests: seed CNN on 512 MNIST examples, 2 short epochs."""

from configs import mnist_bn


def get_config():
  config = mnist_bn.get_config()
  config.num_train_examples = 512
  config.num_eval_examples = 128
  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_epochs = 2
  config.learning_rate = 0.003
  config.checkpoint_every_steps = 3
  config.log_every_steps = 2
  return config
