"""train.py starts quietly: nothing of TensorFlow or tfds before its own output."""

import importlib.util
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]

_SCRIPT = """
import logging
import train  # sets TensorFlow's environment before anything imports it
import tensorflow, tensorflow_datasets

def shown(level, path):
  return train._hide_tfds_warnings(logging.LogRecord("absl", level, path, 1, "m", (), None))

tfds_file = tensorflow_datasets.core.utils.file_utils.__file__
assert not shown(logging.WARNING, tfds_file)  # "Variant folder ... has no dataset_info.json"
assert shown(logging.ERROR, tfds_file)
assert shown(logging.WARNING, logging.__file__)
print("ok")
"""


def test_tensorflow_and_tfds_import_silently_after_train_py():
  env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
  result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout == "ok\n"
  # No oneDNN notice, no absl "log messages before absl::InitializeLog()".
  # With the `compile` extra's pip CUDA packages installed (not with `.[train]`),
  # TensorFlow looks for a CUDA driver at import and says it found none: that
  # notice, and only it, is TensorFlow's own and allowed there.
  stderr = result.stderr
  if importlib.util.find_spec("nvidia") is not None:
    lines = stderr.splitlines()
    kept = [line for i, line in enumerate(lines)
            if "cudart_stub.cc" not in line
            and not ("before absl::InitializeLog()" in line and i + 1 < len(lines)
                     and "cudart_stub.cc" in lines[i + 1])]
    stderr = "".join(line + "\n" for line in kept)
  assert stderr == "", result.stderr
