"""Runs the converter's tasks (one shard, or one chunk of files, each) in worker processes.

Each task writes its own file and returns its small stats, so no pixel data
crosses a process boundary; workers report progress through one shared
counter that a bar in the main process follows.
"""

import functools
import multiprocessing
import sys
import threading

import tqdm

_progress = None  # Per worker process: the shared count of records done.


def _init_worker(counter):
  global _progress
  _progress = counter


def _call(fn, task):
  return fn(task, _progress)


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
    pool = ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(counter,))
  bar = tqdm.tqdm(total=total, initial=initial, unit='img', desc=desc,
                  disable=not show_progress, smoothing=0.1)
  stop = threading.Event()
  def poll():  # Workers add to `counter`; the bar follows it.
    while not stop.wait(0.2):
      bar.update(initial + counter.value - bar.n)
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
    bar.update(initial + counter.value - bar.n)
    bar.close()

