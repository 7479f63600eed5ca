"""NumPy (float64) reference of the batch-norm notes' forward and closed-form backward."""

import numpy as np


def feature_reshape(v, shape, feature_axes):
  return np.reshape(v, [d if a in feature_axes else 1 for a, d in enumerate(shape)])


def forward(x, gamma, beta, feature_axes, epsilon):
  """Seed 000: mu = mean(z), var = mean((z - mu)^2), z_norm, gamma * z_norm + beta."""
  x = np.asarray(x, np.float64)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  mu = x.mean(reduction_axes, keepdims=True)
  var = ((x - mu) ** 2).mean(reduction_axes, keepdims=True)
  x_norm = (x - mu) / np.sqrt(var + epsilon)
  y = feature_reshape(gamma, x.shape, feature_axes) * x_norm + feature_reshape(
      beta, x.shape, feature_axes)
  return y, mu.reshape(np.shape(gamma)), var.reshape(np.shape(gamma))


def backward(dy, x, gamma, feature_axes, epsilon):
  """Seed 000's step-by-step backward (dvar, dmu, dx), summed instead of averaged."""
  x = np.asarray(x, np.float64)
  dy = np.asarray(dy, np.float64)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  m = np.prod([x.shape[a] for a in reduction_axes])
  mu = x.mean(reduction_axes, keepdims=True)
  var = ((x - mu) ** 2).mean(reduction_axes, keepdims=True)
  x_norm = (x - mu) / np.sqrt(var + epsilon)
  g = feature_reshape(gamma, x.shape, feature_axes)
  dbeta = dy.sum(reduction_axes)
  dgamma = (dy * x_norm).sum(reduction_axes)
  dx_norm = dy * g
  dvar = (dx_norm * (x - mu) * -0.5 * (var + epsilon) ** -1.5).sum(reduction_axes, keepdims=True)
  dmu = (dx_norm * -1 / np.sqrt(var + epsilon)).sum(reduction_axes, keepdims=True) + dvar * (
      -2 * (x - mu)).mean(reduction_axes, keepdims=True)
  dx = dx_norm / np.sqrt(var + epsilon) + 2 * (x - mu) / m * dvar + dmu / m
  return dx, dgamma.reshape(np.shape(gamma)), dbeta.reshape(np.shape(gamma))
