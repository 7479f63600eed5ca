"""The Keras MNIST CNN without batch normalization (conv/dense keep their biases)."""

from configs import mnist_bn


def get_config():
  config = mnist_bn.get_config()
  config.use_bn = False
  return config
