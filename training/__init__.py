"""Data-parallel MNIST training with jaxbn (the library behind train.py)."""
