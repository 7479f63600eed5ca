"""The BN paper's MNIST network: 3 hidden layers of 100 sigmoid units.

Ioffe & Szegedy (2015), section 4.1: BN before each sigmoid, mini-batches of
60, 50,000 steps (60 epochs of 50k examples). Without BN:
`--config.use_bn=False`.
"""

from configs import mnist_bn


def get_config():
  config = mnist_bn.get_config()
  config.model = "mlp"
  config.batch_size = 60
  config.eval_batch_size = 1000
  config.num_epochs = 60
  config.optimizer = "sgd"
  config.learning_rate = 0.5
  config.lr_schedule = "constant"
  config.checkpoint_every_steps = 2000
  config.log_every_steps = 100
  return config
