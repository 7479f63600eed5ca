"""Host throughput of the input pipeline: examples/s of `train_batches`.

The training loop never waits for data when the pipeline delivers more
examples per second than the step consumes. This script times the host side
of each kind of source, one global batch per process (a single process here):

* `mnist`: in memory, no augmentation (numpy gather + scaling);
* `synthetic-32 + cifar`: 32x32x3 in memory, pad-4 crop + flip in tf.data;
* `imagenet2012 (fake)`: the real tfds imagenet2012 builder prepared from
  fake ILSVRC tars of random 375x500 JPEGs (ImageNet's typical size),
  streamed: JPEG crop decode, bicubic resize to 224, flip.

  python -m benchmarks.input_pipeline                # batch 128, 20 batches each
  python -m benchmarks.input_pipeline --tiny         # smoke test
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from training import fake_imagenet  # noqa: E402
from training import input_pipeline  # noqa: E402


def _examples_per_sec(source, batch_size: int, num_batches: int) -> float:
  batches = input_pipeline.train_batches(source, global_batch_size=batch_size, seed=0,
                                         epoch=0, rows=slice(0, batch_size))
  next(batches)  # pipeline start-up (threads, shuffle buffer) is not throughput
  start = time.perf_counter()
  count = 0
  for count, _ in enumerate(batches, start=1):
    if count == num_batches:
      break
  return count * batch_size / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--num_batches", type=int, default=20)
  parser.add_argument("--tiny", action="store_true", help="a few seconds: smoke test")
  args = parser.parse_args()
  if args.tiny:
    args.batch_size, args.num_batches = 8, 2
  needed = (args.num_batches + 1) * args.batch_size
  rows = []
  mnist, _ = input_pipeline.load_dataset("mnist", ["train[:50000]"])
  rows.append(("mnist (in memory, none)", mnist["train[:50000]"]))
  synthetic, _ = input_pipeline.load_dataset("synthetic", ["train"], image_size=32,
                                             augmentation="cifar")
  rows.append(("synthetic 32x32x3 (in memory, cifar)", synthetic["train"]))
  with tempfile.TemporaryDirectory() as tmp:
    per_class = -(-needed // 2)
    fake_imagenet.write_fake_imagenet(
        pathlib.Path(tmp) / "manual", train_per_class=per_class, num_validation=1,
        train_sizes=lambda i: (375, 500))
    imagenet, _ = input_pipeline.load_dataset(
        "imagenet2012", ["train"], data_dir=pathlib.Path(tmp) / "tfds",
        manual_dir=pathlib.Path(tmp) / "manual")
    rows.append(("imagenet2012 fake 375x500 JPEGs (streamed, imagenet 224)",
                 imagenet["train"]))
    print(f"batch {args.batch_size}, {args.num_batches} batches after the first\n")
    print("| source | host examples/s |\n|---|---|")
    for name, source in rows:
      rate = _examples_per_sec(source, args.batch_size, args.num_batches)
      print(f"| {name} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
  main()
