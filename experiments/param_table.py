"""Seed 003's Keras parameter table, reproduced from the jaxbn model.

The seed's `model.summary()` of its CNN lists 38,910 parameters: 38,650
trainable and 260 non-trainable (the BN moving means and variances, 2 per
feature). This builds `training.models.MnistCNN` and counts the leaves of its
`params` (trainable) and of its `batch_stats`, the BN running means and
variances (non-trainable), layer by layer (`models.parameter_table`: one row
per layer, the parameter-free ReLU, pooling and flatten layers included).

  python -m experiments.param_table --workdir runs/experiments
"""

from __future__ import annotations


from experiments import _common
from training import models

NAME = "param_table"
SEED_TABLE = {  # layer: (output shape, params), from the seed's model.summary()
    "conv1": ((24, 24, 10), 260), "bn1": ((24, 24, 10), 40), "relu1": ((24, 24, 10), 0),
    "pool1": ((12, 12, 10), 0), "conv2": ((8, 8, 20), 5020), "bn2": ((8, 8, 20), 80),
    "relu2": ((8, 8, 20), 0), "pool2": ((4, 4, 20), 0), "flatten": ((320,), 0),
    "dense1": ((100,), 32100), "bn3": ((100,), 400), "relu3": ((100,), 0),
    "dense2": ((10,), 1010),
}
SEED_TOTALS = {"total": 38910, "trainable": 38650, "non_trainable": 260}
INPUT_SHAPE = (28, 28, 1)


def _table(model):
  rows = models.parameter_table(model, INPUT_SHAPE)
  trainable = sum(r.trainable for r in rows)
  non_trainable = sum(r.non_trainable for r in rows)
  return {
      "rows": [{"layer": r.layer, "kind": r.kind, "output_shape": r.output_shape,
                "trainable": r.trainable, "non_trainable": r.non_trainable,
                "total": r.trainable + r.non_trainable} for r in rows],
      "total": trainable + non_trainable, "trainable": trainable,
      "non_trainable": non_trainable,
      "formatted": models.format_parameter_table(rows),
  }


def run(args) -> dict:
  del args
  cnn = _table(models.create_model("cnn", num_classes=10))
  matches = {
      "totals": all(cnn[k] == v for k, v in SEED_TOTALS.items()),
      "rows": [r["layer"] for r in cnn["rows"]] == list(SEED_TABLE) and all(
          tuple(r["output_shape"]) == SEED_TABLE[r["layer"]][0]
          and r["total"] == SEED_TABLE[r["layer"]][1] for r in cnn["rows"]),
  }
  results = {
      "cnn": cnn,
      "cnn_without_bn": _table(models.create_model("cnn", num_classes=10, use_bn=False)),
      "cnn_no_bias_before_bn": _table(models.create_model("cnn", num_classes=10,
                                                          bias_before_bn=False)),
      "bn_paper_mlp": _table(models.create_model("mlp", num_classes=10)),
      "seed_table": SEED_TABLE, "seed_totals": SEED_TOTALS,
      "matches_seed": matches,
  }
  print(cnn["formatted"])
  print("matches the seed's table:", matches)
  return results


def main(argv=None):
  _common.run_experiment(NAME, __doc__, run, argv=argv)


if __name__ == "__main__":
  main()
