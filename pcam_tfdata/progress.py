"""One progress display for conversion, training, evaluation and prediction.

On a terminal, a live tqdm bar (done of the total, the running metrics,
images/s), as Keras' `fit` shows; in a Jupyter notebook, tqdm's notebook
widget (`tqdm.auto`; its text bar when ipywidgets is missing). In a log
file, where a bar would be thousands of carriage returns, a plain line every
`interval` seconds. The caller decides who shows it (the chief only, and not
with --noprogress). TensorFlow-free: the converter uses it too.
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


def in_notebook():
  """Whether this process is a Jupyter kernel (as tqdm.autonotebook decides it)."""
  ipython = sys.modules.get('IPython')
  try:
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and 'IPKernelApp' in shell.config
  except Exception:  # pylint: disable=broad-except  # Any odd shell: not a kernel.
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

  def __init__(self, total, desc, *, images_per_step, unit='step', initial=0, leave=False,
               enabled=True, stream=None, interval=LOG_INTERVAL_SECONDS, live=None,
               clock=time.monotonic):
    """Args:
      total: steps in the whole pass (an epoch, a split, the test set, the
        images to convert).
      desc: what is running, e.g. 'epoch 3/10'.
      images_per_step: images in one step, for images/s; None when a step
        is an image (the bar's own rate then says it).
      unit: what a step is called ('step'; the converter counts 'img').
      initial: steps done before this pass started (a resumed conversion).
      leave: keep the finished bar on screen (the trainer prints its own
        per-epoch line instead).
      enabled: False shows nothing (other workers, --noprogress).
      stream: where to write; default sys.stderr, so stdout keeps only results.
      interval: seconds between lines when not on a terminal.
      live: force the bar (True) or lines (False); default: a bar on a
        terminal or in a notebook.
      clock: seconds, monotonic (tests pass a fake one).
    """
    self._total = total
    self._desc = desc
    self._images_per_step = images_per_step
    self._unit = unit
    self._initial = self._done = initial
    self._stream = stream or sys.stderr
    self._interval = interval
    self._clock = clock
    self._enabled = enabled and total > 0
    notebook = in_notebook()
    if live is None:
      live = notebook or _is_terminal(self._stream)
    self._live = self._enabled and live
    self._start = self._last_line = clock()
    self._bar = None
    if self._live:
      if notebook:  # The widget (tqdm.auto decides, and sizes it itself).
        from tqdm import auto  # pylint: disable=g-import-not-at-top
        bar_class, size = auto.tqdm, {}
      else:
        bar_class = tqdm.tqdm
        size = ({'dynamic_ncols': True} if _known_size(self._stream)
                else {'ncols': 100, 'nrows': 24})
      self._bar = bar_class(total=total, initial=initial, desc=desc, unit=unit,
                            file=self._stream, leave=leave, smoothing=0.1, **size)

  def update(self, done, **metrics):
    """Shows that `done` of `total` steps are finished, with running `metrics`."""
    self._done = done
    if not self._enabled:
      return
    rate = ((done - self._initial) * (self._images_per_step or 1) /
            max(self._clock() - self._start, 1e-9))
    shown = {k: f'{v:.4f}' if isinstance(v, float) else str(v) for k, v in metrics.items()}
    if self._images_per_step is not None or self._bar is None:
      shown['images/s'] = f'{rate:,.0f}'
    if self._bar is not None:
      if shown:
        self._bar.set_postfix(shown, refresh=False)
      self._bar.update(done - self._bar.n)  # Redraws at most every 0.1 s.
      return
    now = self._clock()
    if now - self._last_line >= self._interval and done < self._total:
      self._last_line = now
      text = ' '.join(f'{k}={v}' for k, v in shown.items())
      print(f'{self._desc}: {done:,}/{self._total:,} {self._unit}s {text}', file=self._stream,
            flush=True)

  def advance(self, steps, **metrics):
    """Shows that `steps` more steps are finished."""
    self.update(self._done + steps, **metrics)

  def close(self):
    if self._bar is not None:
      self._bar.refresh()  # The last state, even if the final update came within 0.1 s.
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
