"""What a run reports: log lines, a progress bar, metrics.jsonl, curves.png, TensorBoard."""

from __future__ import annotations

import json
import queue
import sys
import threading

from etils import epath

from training import files
from training import prepare


METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "curves.png"
# curves.png is redrawn after an epoch only if this long has passed since the
# last drawing (epochs of a long run), and always when train_and_evaluate ends.
PLOT_EVERY_SECONDS = 300.0


def write_metrics(workdir: epath.Path, history: list[dict]) -> None:
  """Rewrites `metrics.jsonl` (one JSON object per epoch) from the history."""
  text = "".join(json.dumps(record) + "\n" for record in history)
  files.atomic_write(workdir / METRICS_FILE, lambda f: f.write(text.encode()))


def plot_curves(path: epath.Path, history: list[dict]) -> None:
  """Loss and accuracy per epoch (train / validation / test) as a PNG."""
  from matplotlib import ticker
  from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
  figure = Figure(figsize=(10, 4))
  axes = figure.subplots(1, 2)
  for ax, metric in zip(axes, ("loss", "accuracy")):
    for split in ("train", "val", "test"):
      points = [(record["epoch"], record[f"{split}_{metric}"]) for record in history
                if f"{split}_{metric}" in record]  # test: the last epoch (or on request)
      if points:
        ax.plot(*zip(*points), "o-", label=split)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend()
  figure.tight_layout()
  files.atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))


class ProgressBar:
  """A tqdm bar on a terminal (process 0 only); nothing otherwise."""

  def __init__(self, enabled: bool):
    self._enabled = enabled and sys.stderr.isatty()
    self._bar = None

  @property
  def shown(self) -> bool:
    """Whether a bar is drawn (else `train_epoch` prints a line per log step)."""
    return self._enabled

  def start_epoch(self, epoch: int, num_epochs: int, total: int, initial: int):
    if self._enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, unit="step", leave=False,
                       desc=f"epoch {epoch + 1}/{num_epochs}", dynamic_ncols=True)

  def update(self, steps: int, loss: float, examples_per_sec: float):
    if self._bar is not None:
      self._bar.update(steps)
      self._bar.set_postfix({"loss": f"{loss:.4f}",
                             "examples/s": f"{examples_per_sec:,.0f}"})

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


class SummaryWriter:
  """TensorBoard scalars in `logdir` (process 0), written by a background thread.

  TensorFlow's own summary writer (`tf.summary.write` with the scalars
  plugin's metadata: what `tf.summary.scalar` writes), since TensorFlow is
  already a dependency of the input pipeline; `clu.metric_writers`, as flax's
  examples use, needs the separate `tensorboard` package as well. The thread
  imports TensorFlow (seconds), so training does not wait for it; not tfds,
  whose import is not safe next to other threads' imports (`prepare.import_tf`).
  Failures are reported once on stderr and do not stop the run.
  """

  def __init__(self, logdir, enabled: bool = True):
    self._queue = queue.Queue()
    self._thread = None
    if enabled:
      self._thread = threading.Thread(target=self._write, args=(str(logdir),),
                                      daemon=True, name="tensorboard")
      self._thread.start()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._thread is not None:
      self._queue.put((int(step), {k: float(v) for k, v in values.items()}))

  def close(self) -> None:
    """Writes what is queued and closes the file."""
    if self._thread is not None:
      self._queue.put(None)
      self._thread.join()
      self._thread = None

  def _write(self, logdir: str) -> None:
    try:
      tf = prepare.import_tensorflow()
      from tensorflow.core.framework import summary_pb2
      writer = tf.summary.create_file_writer(logdir)
      metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    except Exception as error:  # noqa: BLE001 - the run goes on without TensorBoard
      print(f"TensorBoard summaries are off: {error!r}", file=sys.stderr, flush=True)
      while self._queue.get() is not None:
        pass
      return
    while (item := self._queue.get()) is not None:
      step, values = item
      with writer.as_default():
        for tag, value in values.items():
          tf.summary.write(tag, tf.constant(value, tf.float32), step=step,
                           metadata=metadata)
      if self._queue.empty():
        writer.flush()
    writer.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_record(record: dict, num_epochs: int) -> str:
  line = (f"epoch {record['epoch']}/{num_epochs} step {record['step']}: "
          f"train_loss {record['train_loss']:.4f} "
          f"train_acc {record['train_accuracy']:.4f} "
          f"val_loss {record['val_loss']:.4f} val_acc {record['val_accuracy']:.4f} ")
  if "test_loss" in record:
    line += (f"test_loss {record['test_loss']:.4f} "
             f"test_acc {record['test_accuracy']:.4f} ")
  line += f"{record['examples_per_sec']:,.0f} examples/s"
  if record["nonfinite_steps"]:
    line += f" ({record['nonfinite_steps']} non-finite steps skipped)"
  return line
