"""Fake ILSVRC2012 tar files, laid out as image-net.org ships them (tests and benchmarks
prepare the real tfds imagenet2012 builder from them)."""

import io
import pathlib
import tarfile

import numpy as np

TRAIN_SYNSETS = ("n01440764", "n01443537")


def _jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  from PIL import Image
  buffer = io.BytesIO()
  # 4:4:4 chroma: a crop decoded alone equals the crop of the decoded image.
  Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
      buffer, format="JPEG", quality=95, subsampling=0)
  return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_fake_imagenet(manual_dir: pathlib.Path, *, train_per_class: int = 6,
                        num_validation: int = 6, train_sizes=None,
                        validation_size=(50, 45)) -> None:
  """Writes ILSVRC2012_img_train.tar (one tar per synset) and ILSVRC2012_img_val.tar.

  Args:
    manual_dir: folder to write into.
    train_per_class: JPEGs per synset (2 synsets).
    num_validation: validation JPEGs (labels: tfds' first validation labels).
    train_sizes: `i -> (height, width)` of the i-th training image of a
      synset; default small sizes that differ per image.
    validation_size: `(height, width)` of every validation image.
  """
  train_sizes = train_sizes or (lambda i: (40 + 7 * i, 60 - 3 * i))
  rng = np.random.default_rng(0)
  manual_dir = pathlib.Path(manual_dir)
  manual_dir.mkdir(parents=True, exist_ok=True)
  with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train:
    for synset in TRAIN_SYNSETS:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as synset_tar:
        for i in range(train_per_class):
          _add(synset_tar, f"{synset}_{i}.JPEG", _jpeg(rng, *train_sizes(i)))
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val:
    for i in range(num_validation):
      _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(rng, *validation_size))
