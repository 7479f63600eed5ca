"""Markdown pieces of the report: number formats, table cells and the page being written."""

from __future__ import annotations

import os
import shutil

import numpy as np

from experiments import verdicts


def pct(stats, digits=2) -> str:
  """'98.12 ± 0.10' from a mean_std dict of fractions."""
  if stats is None or stats.get("mean") is None:
    return "n/a"
  return f"{100 * stats['mean']:.{digits}f} ± {100 * stats['std']:.{digits}f}"


def num(stats, fmt="{:.4g}") -> str:
  """'303.6 ± 1.33' from a mean_std dict."""
  if stats is None or stats.get("mean") is None:
    return "n/a"
  return f"{fmt.format(stats['mean'])} ± {fmt.format(stats['std'])}"


def _std(values) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def reach_cell(hits) -> str:
  """'1.25 ± 0.00 (1,952 steps) (2 of 3 seeds)' from first_reaching's per-seed hits."""
  reached = [h for h in hits if h is not None]
  if not reached:
    return "-"
  epochs = [h["epoch"] for h in reached]
  text = (f"{np.mean(epochs):.2f} ± {_std(epochs):.2f}"
          f" ({np.mean([h['step'] for h in reached]):,.0f} steps)")
  return text + ("" if len(epochs) == len(hits) else f" ({len(epochs)} of {len(hits)} seeds)")


def steps_cell(steps) -> str:
  """'1,200 ± 100 (2 of 3)' from per-seed steps (None = never reached)."""
  reached = [s for s in steps if s is not None]
  if not reached:
    return "-"
  text = f"{np.mean(reached):,.0f} ± {_std(reached):,.0f}"
  return text + ("" if len(reached) == len(steps) else f" ({len(reached)} of {len(steps)})")


def ratio_text(ratio: verdicts.Ratio | None) -> str:
  """'2.3x', '>= 1.7x' (a lower bound) or 'n/a (BN never reached it)'."""
  if ratio is None:
    return "n/a (BN never reached it)"
  return f"{'>= ' if ratio.lower_bound else ''}{ratio.value:.2g}x"


def epochs_text(epochs: float) -> str:
  return f"{epochs:g} epoch" + ("" if epochs == 1 else "s")


def lr_text(learning_rate) -> str:
  return "none" if learning_rate is None else f"{learning_rate:g}"


def provenance(record) -> str:
  """'Command: `...` (commit ..., seeds, wall time, platform).' for a section's head."""
  return (f"Command: `{record['command']}` (commit {record['git_commit']}, "
          f"{len(record['seeds'])} seed(s) {record['seeds']}, "
          f"{record['wall_time_s']:.0f} s on {record['platform']}).")


def table_row(*cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


class Page:
  """The lines of docs/results.md, and the figures copied next to it.

  Args:
    workdir: where the experiments wrote `NAME.json` and `NAME.png`.
    output: the markdown file; figures go to `figures/` beside it.
  """

  def __init__(self, workdir: str, output: str):
    self.workdir = workdir
    self.output = output
    self.figure_dir = os.path.join(os.path.dirname(output), "figures")
    self.lines: list[str] = []

  def add(self, *lines: str):
    self.lines.extend(lines)

  def figure(self, record, caption: str):
    """Copies `WORKDIR/STEM.png` to figures/ and links it (nothing if it is missing)."""
    source = os.path.join(self.workdir, f"{record['stem']}.png")
    if not os.path.exists(source):
      return
    os.makedirs(self.figure_dir, exist_ok=True)
    shutil.copy(source, os.path.join(self.figure_dir, f"{record['stem']}.png"))
    self.add(f"![{caption}](figures/{record['stem']}.png)", "",
             f"*Figure: {caption}. Produced by `{record['command']}`.*", "")

  def write(self):
    os.makedirs(os.path.dirname(self.output) or ".", exist_ok=True)
    with open(self.output, "w") as f:
      f.write("\n".join(self.lines).rstrip() + "\n")
    print(f"wrote {self.output}")
