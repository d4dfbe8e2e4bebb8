"""Runs the converter's tasks (one shard, or one chunk of files, each) in worker processes.

Each task writes its own file and returns its small stats, so no pixel data
crosses a process boundary; workers report progress through one shared
counter that a bar in the main process follows.
"""

import contextlib
import functools
import multiprocessing
import os
import sys
import threading
import types

from pcam_tfdata import progress


_progress = None  # Per worker process: the shared count of records done.


def _init_worker(counter):
  global _progress
  _progress = counter


def _call(fn, task):
  return fn(task, _progress)


def default_workers():
  """Worker processes unless told: every core this process may use."""
  return len(os.sched_getaffinity(0))


def _start_method():
  """`fork` where it is safe, else `spawn`.

  Forking is instant, where `spawn` re-imports the caller's modules in every
  worker (about 0.4 s each here, a tenth of converting the full set). It is
  safe only while this process runs a single thread: a forked copy of another
  thread's held lock (TensorFlow's pools in tests and notebooks, a progress
  bar's monitor) can deadlock the worker. So the pool starts before the bar.
  """
  if ('fork' in multiprocessing.get_all_start_methods() and threading.active_count() == 1
      and 'tensorflow' not in sys.modules):
    return 'fork'
  return 'spawn'


@contextlib.contextmanager
def _no_main_to_reimport():
  """While workers start: a __main__ with no file, so `spawn` does not re-run the caller's script.

  A spawned worker re-imports the parent's main script (to unpickle what it
  defines) and so runs its top-level code. A user's script that calls
  `pcam_tfdata.make_records` unguarded by `if __name__ == '__main__':` would
  start its own workers inside each worker, which Python refuses, and the
  pool would replace the dead worker forever: a silent hang. The tasks here
  are functions of this package, so the workers need nothing from __main__.
  """
  main = sys.modules['__main__']
  sys.modules['__main__'] = types.ModuleType('__main__')
  try:
    yield
  finally:
    sys.modules['__main__'] = main


def start_pool(ctx, processes, initializer=None, initargs=()):
  """`ctx.Pool(...)` whose workers never run the caller's script (see `_no_main_to_reimport`)."""
  with _no_main_to_reimport():
    return ctx.Pool(processes, initializer=initializer, initargs=initargs)


def run_tasks(fn, tasks, workers, total, initial, show_progress, desc='converting'):
  """Runs `fn(task, counter)` on each task, in worker processes when workers > 1.

  Yields the results in completion order; the first task that fails raises at
  once. `fn` adds what it has done to the shared counter, which a progress
  bar of `total` follows.
  """
  ctx = multiprocessing.get_context(_start_method())
  counter = ctx.Value('q', 0)
  pool = None
  if workers > 1 and len(tasks) > 1:
    pool = start_pool(ctx, min(workers, len(tasks)), initializer=_init_worker,
                      initargs=(counter,))
  bar = progress.Progress(total, desc, images_per_step=None, unit='img', initial=initial,
                          leave=True, enabled=show_progress)
  stop = threading.Event()
  def poll():  # Workers add to `counter`; the bar follows it.
    while not stop.wait(0.2):
      bar.update(initial + counter.value)
  poller = threading.Thread(target=poll, daemon=True)
  poller.start()
  try:
    if pool is None:
      for task in tasks:
        yield fn(task, counter)
    else:
      yield from pool.imap_unordered(functools.partial(_call, fn), tasks)
      pool.close()
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
    stop.set()
    poller.join()
    bar.update(initial + counter.value)
    bar.close()

