"""One progress display for training, evaluation and prediction.

On a terminal, a live tqdm bar (steps done of the total, the running metrics,
images/s), as Keras' `fit` shows. In a log file, where a bar would be
thousands of carriage returns, a plain line every `interval` seconds. The
caller decides who shows it (the chief only, and not with --noprogress).
"""

import os
import sys
import time

import tqdm

LOG_INTERVAL_SECONDS = 30.0


def _is_terminal(stream):
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # No isatty, or already closed.
    return False


def _known_size(stream):
  """True when the terminal reports its size (a bare pty says 0x0, and tqdm draws nothing)."""
  try:
    size = os.get_terminal_size(stream.fileno())
  except (AttributeError, OSError, ValueError):
    return False
  return size.columns > 0 and size.lines > 0


class Progress:
  """Progress over `total` steps of `images_per_step` images each.

  Use as a context manager; call `update(done, **metrics)` with the number of
  steps done so far and the running metrics to show.
  """

  def __init__(self, total, desc, *, images_per_step, enabled=True, stream=None,
               interval=LOG_INTERVAL_SECONDS, live=None, clock=time.monotonic):
    """Args:
      total: steps in the whole pass (an epoch, a split, the test set).
      desc: what is running, e.g. 'epoch 3/10'.
      images_per_step: images in one step, for images/s.
      enabled: False shows nothing (other workers, --noprogress).
      stream: where to write; default sys.stderr, so stdout keeps only results.
      interval: seconds between lines when not on a terminal.
      live: force the bar (True) or lines (False); default: a bar on a terminal.
      clock: seconds, monotonic (tests pass a fake one).
    """
    self._total = total
    self._desc = desc
    self._images_per_step = images_per_step
    self._stream = stream or sys.stderr
    self._interval = interval
    self._clock = clock
    self._enabled = enabled and total > 0
    self._live = self._enabled and (_is_terminal(self._stream) if live is None else live)
    self._start = self._last_line = clock()
    self._bar = None
    if self._live:
      # leave=False: the per-epoch summary line replaces the finished bar.
      size = {'dynamic_ncols': True} if _known_size(self._stream) else {'ncols': 100, 'nrows': 24}
      self._bar = tqdm.tqdm(total=total, desc=desc, unit='step', file=self._stream, leave=False,
                            smoothing=0.1, **size)

  def update(self, done, **metrics):
    """Shows that `done` of `total` steps are finished, with running `metrics`."""
    if not self._enabled:
      return
    rate = done * self._images_per_step / max(self._clock() - self._start, 1e-9)
    shown = {k: f'{v:.4f}' if isinstance(v, float) else str(v) for k, v in metrics.items()}
    shown['images/s'] = f'{rate:,.0f}'
    if self._bar is not None:
      self._bar.set_postfix(shown, refresh=False)
      self._bar.update(done - self._bar.n)  # Redraws at most every 0.1 s.
      return
    now = self._clock()
    if now - self._last_line >= self._interval and done < self._total:
      self._last_line = now
      text = ' '.join(f'{k}={v}' for k, v in shown.items())
      print(f'{self._desc}: {done}/{self._total} steps {text}', file=self._stream, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.refresh()  # The last state, even if the final update came within 0.1 s.
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
