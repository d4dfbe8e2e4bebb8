r"""Times the converter against the naive loop and the read floor, on the same files.

    python tools/bench_convert.py --num_files=20000 --repeats=3 --json=bench_convert.json

All three read the same freshly generated Kaggle-format TIFFs, warm in the
page cache, in one run:
  * read floor: read each file's bytes once, one process, nothing else;
  * naive loop: Pillow decode, crop, one `tf.train.Example` per image through
    `tf.io.TFRecordWriter`, one process (what a first script does);
  * converter: `pcam_tfdata.convert` as tools/make_records.py runs it (all
    cores), in a fresh process whose own and workers' peak RSS are reported.
Each figure is the median of --repeats runs; ratios are against the same run.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from pcam_tfdata import kaggle
from pcam_tfdata import synthetic

_NUM_FILES = flags.DEFINE_integer('num_files', 20000, 'Kaggle-format TIFFs to generate.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Runs of each method; the median is reported.')
_CROP_SIZE = flags.DEFINE_integer('crop_size', 32, 'Center crop side.')
_WORKERS = flags.DEFINE_integer('workers', len(os.sched_getaffinity(0)), 'Converter processes.')
_WORK_DIR = flags.DEFINE_string('work_dir', None, 'Scratch folder (default: a temp folder).')
_JSON = flags.DEFINE_string('json', None, 'Also write the results here.')

# Runs in a fresh interpreter so its peak memory is the converter's alone.
_CONVERTER = r'''
import json, resource, sys, time
from pcam_tfdata import convert, kaggle
def vm_hwm_mib():  # Peak RSS of this process since exec (ru_maxrss keeps the parent's).
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) for l in f if l.startswith('VmHWM')) / 1024
data_dir, out_dir, crop, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
source = kaggle.read_source(data_dir)
manifest = convert.convert(source, out_dir, crop_size=crop, per_class=0, workers=workers,
                           eda=False, show_progress=False, log=lambda _: None)
seconds = time.perf_counter() - start
print(json.dumps({
    'seconds': seconds,
    'records': sum(s['count'] for s in manifest['splits'].values()),
    'parent_peak_mib': vm_hwm_mib(),
    'worker_peak_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
'''


def _paths(data_dir):
  return sorted(os.path.join(data_dir, 'train', f) for f in os.listdir(os.path.join(data_dir, 'train')))


def read_floor(paths):
  start = time.perf_counter()
  total = 0
  for p in paths:
    with open(p, 'rb') as f:
      total += len(f.read())
  return time.perf_counter() - start


def naive_loop(paths, labels, out_path, crop):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  c = (96 - crop) // 2
  start = time.perf_counter()
  with tf.io.TFRecordWriter(out_path) as writer:
    for p in paths:
      pixels = np.asarray(Image.open(p))[c:c + crop, c:c + crop]
      example_id = os.path.basename(p)[:-4]
      feature = {
          'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[pixels.tobytes()])),
          'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[labels[example_id]])),
          'id': tf.train.Feature(bytes_list=tf.train.BytesList(value=[example_id.encode()])),
      }
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
  return time.perf_counter() - start


def converter(data_dir, out_dir, crop, workers):
  shutil.rmtree(out_dir, ignore_errors=True)
  proc = subprocess.run([sys.executable, '-c', _CONVERTER, data_dir, out_dir, str(crop), str(workers)],
                        capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  work = _WORK_DIR.value or tempfile.mkdtemp(prefix='bench_convert_')
  data_dir = os.path.join(work, 'kaggle')
  shutil.rmtree(data_dir, ignore_errors=True)
  print(f'generating {_NUM_FILES.value} Kaggle-format TIFFs in {data_dir} ...')
  synthetic.make_dataset(data_dir, num_train=_NUM_FILES.value, num_test=0, show_progress=False)
  paths = _paths(data_dir)
  source = kaggle.read_source(data_dir)
  labels = dict(zip(source.ids, source.labels.tolist()))
  n = len(paths)
  times = {'read floor': [], 'naive loop': [], 'converter': []}
  memory = []
  for _ in range(_REPEATS.value):  # Interleaved, so drift on a shared machine hits all three.
    times['read floor'].append(read_floor(paths))
    times['naive loop'].append(naive_loop(paths, labels, os.path.join(work, 'naive.tfrecord'),
                                          _CROP_SIZE.value))
    result = converter(data_dir, os.path.join(work, 'records'), _CROP_SIZE.value, _WORKERS.value)
    assert result['records'] == n, result
    times['converter'].append(result['seconds'])
    memory.append(result)
  rates = {k: n / statistics.median(v) for k, v in times.items()}
  rows = [(k, rates[k], rates[k] / rates['naive loop'], rates[k] / rates['read floor'])
          for k in ('read floor', 'naive loop', 'converter')]
  peak_parent = max(m['parent_peak_mib'] for m in memory)
  peak_worker = max(m['worker_peak_mib'] for m in memory)
  print(f'\n{n} files, crop {_CROP_SIZE.value}, {_WORKERS.value} converter workers, '
        f'{os.cpu_count()} cores, median of {_REPEATS.value}')
  print('| method | images/s | x naive loop | x read floor |')
  print('|---|---:|---:|---:|')
  for name, rate, vs_naive, vs_floor in rows:
    print(f'| {name} | {rate:,.0f} | {vs_naive:.1f} | {vs_floor:.2f} |')
  print(f'\nconverter peak RSS: main process {peak_parent:.0f} MiB, largest worker '
        f'{peak_worker:.0f} MiB, at most {peak_parent + _WORKERS.value * peak_worker:.0f} MiB '
        'in all')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'files': n, 'crop_size': _CROP_SIZE.value, 'workers': _WORKERS.value,
                 'seconds': times, 'images_per_second': rates,
                 'peak_rss_mib': {'main': peak_parent, 'worker': peak_worker}}, f, indent=1)
  if not _WORK_DIR.value:
    shutil.rmtree(work)


if __name__ == '__main__':
  app.run(main)
