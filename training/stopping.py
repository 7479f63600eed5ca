"""Stopping a run: SIGTERM (preemption) agreed on by every process, and a watchdog.

`StopRequest` turns SIGTERM into a flag that all processes agree on at the
same steps (`agreed`); the training loop then saves a checkpoint and raises
`Preempted`, and train.py exits with `PREEMPTED_EXIT_CODE`. `Watchdog` ends a
process that stopped progressing or outlives SIGTERM's grace period.
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import sys
import threading
import time

import jax
from jax.experimental import multihost_utils
import numpy as np


# sysexits.h EX_TEMPFAIL ("try again later"): the run was preempted after
# saving a checkpoint; rerunning the same command resumes it.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """SIGTERM was received; every process saved a checkpoint at `step`."""

  def __init__(self, step: int):
    super().__init__(f"Preempted (SIGTERM): checkpoint saved at step {step}; rerun "
                     "the same command to resume.")
    self.step = step


class Watchdog:
  """Ends a process whose run stopped progressing, or that outlives SIGTERM's grace.

  Both deadlines are `faulthandler.dump_traceback_later` timers: a C thread that
  needs neither the GIL nor the main thread (which may be stuck inside a
  collective whose peer is gone), prints every thread's Python stack to stderr
  (headed "Timeout (H:MM:SS)!") and exits with status 1. `beat` re-arms the
  stall timer; after SIGTERM the grace timer replaces it and beats no longer
  move it.
  """

  def __init__(self, stall_seconds: float, grace_seconds: float):
    self._stall = stall_seconds
    self._grace = grace_seconds
    self._lock = threading.Lock()
    self._armed = False
    self._terminating = False
    self._last_arm = -math.inf

  def beat(self) -> None:
    """Progress: the stall deadline moves to `stall_seconds` from now."""
    if not self._stall or self._terminating:
      return
    now = time.monotonic()
    if now - self._last_arm < min(1.0, self._stall / 10):
      return  # re-arming starts a C thread; once a second is plenty
    with self._lock:
      if not self._terminating:
        faulthandler.dump_traceback_later(self._stall, exit=True, file=_stderr())
        self._armed, self._last_arm = True, now

  def pause(self) -> None:
    """No stall deadline until the next `beat` (e.g. while compiling)."""
    with self._lock:
      if self._armed and not self._terminating:
        faulthandler.cancel_dump_traceback_later()
        self._armed, self._last_arm = False, -math.inf

  def terminate(self) -> None:
    """SIGTERM: the process exits within `grace_seconds` whatever happens."""
    with self._lock:
      if self._terminating:
        return
      self._terminating = True
      print(f"SIGTERM: saving a checkpoint at the next step the processes agree on; "
            f"exiting with an error if that takes more than {self._grace:g} s.",
            file=sys.stderr, flush=True)
      faulthandler.dump_traceback_later(self._grace, exit=True, file=_stderr())
      self._armed = True

  def close(self) -> None:
    with self._lock:
      if self._armed:
        faulthandler.cancel_dump_traceback_later()
        self._armed = False


def _stderr():
  """A stderr with a file descriptor (pytest's captured sys.stderr has none)."""
  try:
    sys.stderr.fileno()
    return sys.stderr
  except (AttributeError, OSError, ValueError):
    return sys.__stderr__


class StopRequest:
  """SIGTERM sets a flag; processes agree on it at the same steps.

  Python runs signal handlers in the main thread only, and only between
  bytecodes: a main thread stuck in a collective never would. So the signal
  also wakes a helper thread (through `signal.set_wakeup_fd`), which starts
  the watchdog's grace period. Installed only when `train_and_evaluate` runs
  in the main thread; elsewhere SIGTERM keeps its previous meaning.
  """

  def __init__(self, watchdog: Watchdog | None = None):
    self.requested = False
    self._watchdog = watchdog
    self._previous = None
    self._previous_wakeup_fd = -1
    self._pipe = None
    self._thread = None

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    self._pipe = (read_fd, write_fd)
    self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    self._thread = threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                                    name="sigterm-watch")
    self._thread.start()

  def uninstall(self) -> None:
    if self._pipe is None:
      return
    signal.set_wakeup_fd(self._previous_wakeup_fd)
    signal.signal(signal.SIGTERM, self._previous)
    read_fd, write_fd = self._pipe
    os.write(write_fd, b"\0")  # wakes the thread, which then returns
    self._thread.join()
    os.close(read_fd)
    os.close(write_fd)
    self._pipe = self._thread = None

  def _watch(self, read_fd: int) -> None:
    while True:
      received = os.read(read_fd, 64)
      if not received or 0 in received:
        return
      if signal.SIGTERM in received:
        self.requested = True
        if self._watchdog is not None:
          self._watchdog.terminate()

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def agreed(self, state=None) -> bool:
    """True on every process if any process got SIGTERM (a collective).

    Every process must call this at the same steps. With several processes
    `state` (the last step's output) is waited for first, so that the
    agreement's program does not run next to a step's.
    """
    if jax.process_count() == 1:
      return self.requested
    jax.block_until_ready(state)
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))


def with_heartbeat(items, heartbeat):
  """Yields `items`, calling `heartbeat()` after each (e.g. `Watchdog.beat`)."""
  for item in items:
    yield item
    heartbeat()
