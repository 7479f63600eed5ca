"""Shared benchmark utilities: interleaved timing, markdown tables, HLO counts.

Timing protocol (every script): each case is a zero-argument callable that runs
one step to completion (`jax.block_until_ready` for JAX, synchronous for
PyTorch on CPU). All cases are warmed up (compilation excluded), then timed
round-robin: repetition `r` runs every case once, starting at a rotating
offset, so machine drift and neighbours' load spread over all of them. Tables
report the median and the min-max over repetitions.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import re
import shlex
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from training import hlo

# PyTorch's OpenMP workers spin after each parallel region by default; on a
# machine with more runnable threads than cores that spinning starves both
# PyTorch itself (measured: a tiny BatchNorm2d step 128 ms instead of 1 ms) and
# whatever runs next. Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COLLECTIVE_OPS = hlo.COLLECTIVE_OPS


class Timing(NamedTuple):
  """Wall-clock seconds of the timed repetitions of one case.

  `cpu_seconds` (when recorded) is the process's CPU time per repetition, all
  threads: steadier than wall time when neighbours take the cores.
  """
  seconds: np.ndarray
  cpu_seconds: np.ndarray | None = None

  @property
  def median(self) -> float:
    return float(np.median(self.seconds))

  @property
  def min(self) -> float:
    return float(np.min(self.seconds))

  @property
  def max(self) -> float:
    return float(np.max(self.seconds))

  @property
  def count(self) -> int:
    return len(self.seconds)

  def ms(self) -> str:
    """`median (min-max)` in milliseconds."""
    return f"{fmt_ms(self.median)} ({fmt_ms(self.min)}-{fmt_ms(self.max)})"


def fmt_ms(seconds: float) -> str:
  ms = seconds * 1e3
  if ms >= 100:
    return f"{ms:.0f}"
  if ms >= 10:
    return f"{ms:.1f}"
  return f"{ms:.2f}"


def time_interleaved(cases: dict[str, Callable[[], Any]], *, repeats: int,
                     warmup: int = 2, budget_seconds: float = 0.0,
                     max_repeats: int = 100, cpu_time: bool = False
                     ) -> dict[str, Timing]:
  """Times every case round-robin, at least `repeats` times each.

  Args:
    cases: name -> callable that runs one step synchronously.
    repeats: minimum timed repetitions per case.
    warmup: untimed calls per case first (compilation, caches, allocator).
    budget_seconds: keep adding rounds (up to `max_repeats`) while the timed
      rounds have taken less than this: fast cases get more samples, which
      steadies their medians on a noisy machine.
    max_repeats: cap on repetitions when `budget_seconds` is given.
    cpu_time: also record the process CPU time of each repetition.

  Returns:
    name -> `Timing`, in the order of `cases`; every case has the same number
    of repetitions.
  """
  names = list(cases)
  for name in names:
    for _ in range(warmup):
      cases[name]()
  samples = {name: [] for name in names}
  cpu = {name: [] for name in names}
  started = time.perf_counter()
  rep = 0
  while rep < repeats or (time.perf_counter() - started < budget_seconds
                          and rep < max_repeats):
    offset = rep % len(names)
    for name in names[offset:] + names[:offset]:
      cpu_start = time.process_time()
      start = time.perf_counter()
      cases[name]()
      samples[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - cpu_start)
    rep += 1
  return {name: Timing(np.asarray(samples[name]),
                       np.asarray(cpu[name]) if cpu_time else None) for name in names}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; right-aligns columns whose cells look numeric."""
  def is_number(text):
    return bool(re.fullmatch(r"[-+]?[\d.,]+(e[-+]?\d+)?[x%]?( \(.*\))?", text))
  cells = [[str(c) for c in row] for row in rows]
  align = []
  for j in range(len(headers)):
    column = [row[j] for row in cells if j < len(row)]
    numeric = column and all(is_number(c) or c in ("-", "n/a", "nan") for c in column)
    align.append("---:" if numeric else "---")
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in cells]
  return "\n".join(lines)


def command_line() -> str:
  """The command that reproduces this run, as typed from the repository root."""
  module = sys.modules["__main__"].__spec__
  head = f"python -m {module.name}" if module is not None else f"python {sys.argv[0]}"
  return " ".join([head] + [shlex.quote(a) for a in sys.argv[1:]])


_MALLOC_MODE = "default"
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def configure_malloc(mode: str) -> str:
  """Makes glibc keep freed memory for reuse ("reuse") or leaves it ("default").

  With glibc's defaults a buffer above the dynamic mmap threshold (at most
  32 MB) is mmapped on every allocation and unmapped when freed, so each call
  that returns a fresh 51 MB output first page-faults 12,545 pages (measured:
  a jitted `x * 2` on (64,56,56,64) f32 takes 30 ms instead of 4 ms). That
  cost is the same for every implementation and hides the kernels being
  compared; "reuse" (no mmap, no trimming) removes it. PyTorch's CPU
  allocator sits on the same malloc.

  Returns:
    The mode in effect ("default" when mallopt is unavailable).
  """
  global _MALLOC_MODE
  if mode == "reuse":
    try:
      libc = ctypes.CDLL("libc.so.6")
      if libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1):
        _MALLOC_MODE = "reuse"
    except OSError:  # not glibc
      pass
  return _MALLOC_MODE


def add_malloc_flag(parser) -> None:
  parser.add_argument(
      "--malloc", choices=("reuse", "default"), default="reuse",
      help="reuse: glibc keeps freed buffers (no per-call page faults on large "
      "outputs, the default here); default: glibc's own thresholds")


def print_header(title: str) -> None:
  """Prints the title, the reproducing command and the machine state."""
  import jax
  load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
  print(f"## {title}\n")
  print(f"Command: `{command_line()}`\n")
  malloc = ("glibc malloc set to reuse freed memory (`--malloc reuse`)"
            if _MALLOC_MODE == "reuse" else "glibc malloc defaults")
  print(f"Run at {datetime.datetime.now().isoformat(timespec='seconds')} on "
        f"{platform.machine()} with {os.cpu_count()} CPUs (load average "
        f"{load[0]:.1f} at start), jax {jax.__version__}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), {malloc}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}.\n")


def print_table(title: str, headers, rows, note: str | None = None) -> None:
  """Prints one markdown table with the reproducing command above it."""
  print(f"### {title}\n")
  print(f"`{command_line()}`\n")
  print(markdown_table(headers, rows))
  if note:
    print(f"\n{note}")
  print(flush=True)


def temp_bytes(compiled) -> int:
  """Temporary buffer bytes of a compiled JAX executable (`memory_analysis()`)."""
  return int(compiled.memory_analysis().temp_size_in_bytes)


def fmt_ratio(value: float) -> str:
  if not np.isfinite(value):
    return "n/a"
  return f"{value:.2f}x"
