"""Host throughput of the input pipeline: images/s of `train_batches`, per worker core.

The training loop never waits for data when the pipeline delivers more
images per second than the step consumes. This script times the host side
of each kind of source, one global batch per process (a single process here),
as `train_batches` hands it to the loop (uint8 images; the steps normalize on
the device):

* `mnist`: in memory, no augmentation (a numpy gather of uint8 rows; no
  tf.data, so no workers);
* `synthetic-32 + cifar`: 32x32x3 in memory, pad-4 crop + flip in tf.data;
* `imagenet2012 (fake)`: the real tfds imagenet2012 builder prepared from
  fake ILSVRC tars of random 375x500 JPEGs (ImageNet's typical size),
  streamed: JPEG crop decode, bicubic resize to 224, flip (ImageNet's train
  pipeline, `configs/resnet_imagenet.py`).

The tf.data sources run with 1 and 2 workers (`num_workers`: threads of one
core each). Two measures per core: images/s divided by the workers (what a
host with that many free cores gets per core), and images per CPU second of
all the process's threads (the work per image, which other jobs on a shared
machine do not change; on a quiet host the two agree when every worker has
its core).
The last lines compare the ImageNet rate per core with what one H100 consumes
in ResNet-50's train step, the roofline ESTIMATE stored in
`benchmarks/results/compiled_resnet50.json` (`python -m benchmarks.compiled`;
BENCHMARKS.md): a compiler-based estimate, not a timing.

  python -m benchmarks.input_pipeline                # batch 128, 20 batches each
  python -m benchmarks.input_pipeline --tiny         # smoke test
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from training import datasets  # noqa: E402
from training import fake_imagenet  # noqa: E402
from training import input_pipeline  # noqa: E402

COMPILED_RESULTS = (pathlib.Path(__file__).resolve().parent / "results"
                    / "compiled_resnet50.json")


def _throughput(source, batch_size: int, num_batches: int, num_workers: int
                ) -> tuple[float, float]:
  """(images per wall second, images per CPU second of this process's threads)."""
  batches = input_pipeline.train_batches(source, global_batch_size=batch_size, seed=0,
                                         epoch=0, rows=slice(0, batch_size),
                                         num_workers=num_workers)
  next(batches)  # pipeline start-up (threads, shuffle buffer) is not throughput
  start, start_cpu = time.perf_counter(), time.process_time()
  count = 0
  for count, _ in enumerate(batches, start=1):
    if count == num_batches:
      break
  images = count * batch_size
  return (images / (time.perf_counter() - start),
          images / max(time.process_time() - start_cpu, 1e-9))


def h100_resnet50_images_per_sec(path: pathlib.Path = COMPILED_RESULTS) -> tuple[float, str]:
  """One H100's images/s in ResNet-50's train step: the stored roofline estimate.

  Returns:
    `(images/s per device, description of the row it comes from)`.
  """
  results = json.loads(path.read_text())
  for row in results["rows"]:
    if (row["target"].startswith("h100:") and row["model"] == "resnet50"
        and row["norm"] == "jaxbn"):
      devices = int(row["target"].split(":")[1])
      return row["est_images_per_s"] / devices, (
          f"{row['target']} {row['dtype']} {row['parallelism']} jaxbn, "
          f"{row['per_device_batch']} images per device, {row['bound']}-bound roofline "
          f"{row['est_step_s'] * 1e3:.1f} ms per step")
  raise ValueError(f"{path} has no h100 resnet50 jaxbn row; run `{results['commands'][0]}`.")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--num_batches", type=int, default=20)
  parser.add_argument("--workers", default="1,2",
                      help="comma-separated tf.data worker counts to time")
  parser.add_argument("--tiny", action="store_true", help="a few seconds: smoke test")
  args = parser.parse_args(argv)
  if args.tiny:
    args.batch_size, args.num_batches = 8, 2
  workers = [int(n) for n in args.workers.split(",")]
  needed = (args.num_batches + 1) * args.batch_size
  rows = []
  mnist, _ = datasets.load_dataset("mnist", ["train[:50000]"])
  rows.append(("mnist (in memory, none)", mnist["train[:50000]"], False))
  synthetic, _ = datasets.load_dataset("synthetic", ["train"], image_size=32,
                                       augmentation="cifar")
  rows.append(("synthetic 32x32x3 (in memory, cifar)", synthetic["train"], True))
  imagenet_name = "imagenet2012 fake 375x500 JPEGs (streamed, imagenet 224)"
  per_core = {}
  with tempfile.TemporaryDirectory() as tmp:
    per_class = -(-needed // 2)
    fake_imagenet.write_fake_imagenet(
        pathlib.Path(tmp) / "manual", train_per_class=per_class, num_validation=1,
        train_sizes=lambda i: (375, 500))
    imagenet, _ = datasets.load_dataset(
        "imagenet2012", ["train"], data_dir=pathlib.Path(tmp) / "tfds",
        manual_dir=pathlib.Path(tmp) / "manual")
    rows.append((imagenet_name, imagenet["train"], True))
    print(f"batch {args.batch_size}, {args.num_batches} batches after the first; "
          f"{input_pipeline.host_cores()} host cores\n")
    print("| source | tf.data workers | host images/s | images/s per worker | "
          "images per CPU second | cores busy |\n|---|---:|---:|---:|---:|---:|")
    for name, source, uses_workers in rows:
      for num_workers in workers if uses_workers else [1]:
        rate, per_cpu_second = _throughput(source, args.batch_size, args.num_batches,
                                           num_workers)
        busy = rate / per_cpu_second
        if uses_workers:
          per_core[name, num_workers] = per_cpu_second
          print(f"| {name} | {num_workers} | {rate:,.0f} | {rate / num_workers:,.0f} | "
                f"{per_cpu_second:,.0f} | {busy:.2f} |", flush=True)
        else:
          print(f"| {name} | none (numpy gather) | {rate:,.0f} | | {per_cpu_second:,.0f} | "
                f"{busy:.2f} |", flush=True)
  h100, where = h100_resnet50_images_per_sec()
  best = max(rate for (name, _), rate in per_core.items() if name == imagenet_name)
  print(f"\nOne H100 in ResNet-50's train step: {h100:,.0f} images/s, a compiler-based "
        f"roofline ESTIMATE, not a timing ({COMPILED_RESULTS.name}: {where}).")
  print(f"At {best:,.0f} ImageNet images per CPU second (the best row above), one "
        f"H100 needs about {h100 / best:,.1f} host cores of decode + augment.")


if __name__ == "__main__":
  main()
