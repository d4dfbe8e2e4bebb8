r"""Times the converter against the naive loop and the read floor, on the same files.

    python tools/bench_convert.py --num_files=20000 --repeats=3 --json=bench_convert.json
    python tools/bench_convert.py --data_dir=/tmp/bench_src --h5_patches=0

Every method reads the same Kaggle-format TIFFs, freshly generated (or the
train/ of --data_dir: a larger set weighs the converter's start-up less),
warm in the page cache, in one run:
  * read floor: read each file's bytes once, nothing else, in one process
    and in as many processes as the converter runs (--workers): each
    converter row is read against the floor of its own process count;
  * naive loop: Pillow decode, crop, one `tf.train.Example` per image through
    `tf.io.TFRecordWriter`, one process (what a first script does);
  * converter, one worker: `pcam_tfdata.convert.from_kaggle` in one process,
    beside the naive loop, so the gain of the code itself reads per core;
  * converter: `pcam_tfdata.convert.from_kaggle` as tools/make_records.py runs it
    (--workers, all cores by default), in a fresh process whose own and
    workers' peak RSS are reported;
  * converter with --drop_duplicates: the same plus its scan, which reads
    every patch and keys it and its stored crop before planning (the data
    holds no duplicates, so this is the cost of looking).
The PCam HDF5 part (--h5_patches) times the same on a generated train
split: without duplicates, with and without --drop_duplicates; with every
patch one of 256; and with every stored crop one of 256 under distinct
borders, where every crop is read again to confirm its group (counted, and
dropped down to 256).
Each figure is the median of --repeats runs, interleaved; ratios are against
the same run. The table says how many processes each method used.
"""

import json
import multiprocessing
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

from pcam_tfdata import cli
from pcam_tfdata.convert import kaggle
from pcam_tfdata.convert import synthetic
from pcam_tfdata import hostinfo
from pcam_tfdata import schema

_NUM_FILES = flags.DEFINE_integer('num_files', 20000, 'Kaggle-format TIFFs to generate.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Runs of each method; the median is reported.')
_CROP_SIZE = flags.DEFINE_integer('crop_size', 32, 'Center crop side.')
_WORKERS = flags.DEFINE_integer('workers', len(os.sched_getaffinity(0)), 'Converter processes.')
_WORK_DIR = flags.DEFINE_string('work_dir', None, 'Scratch folder (default: a temp folder).')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'An existing Kaggle-layout folder to convert instead of generating '
    '--num_files TIFFs (its train/ is read; a larger set weighs start-up less).')
_H5_PATCHES = flags.DEFINE_integer(
    'h5_patches', 30000, 'Patches in the generated PCam HDF5 train split (0 skips that part).')
_JSON = flags.DEFINE_string('json', None, 'Also write the results here.')

# Runs in a fresh interpreter so its peak memory is the converter's alone.
_CONVERTER = r'''
import json, resource, sys, time
from pcam_tfdata.convert import from_kaggle, kaggle
def vm_hwm_mib():  # Peak RSS of this process since exec (ru_maxrss keeps the parent's).
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) for l in f if l.startswith('VmHWM')) / 1024
data_dir, out_dir, crop, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
drop = sys.argv[5] == 'drop'
start = time.perf_counter()
source = kaggle.read_source(data_dir)
manifest = from_kaggle.convert(source, out_dir, crop_size=crop, per_class=0, workers=workers,
                           eda=False, show_progress=False, log=lambda _: None,
                           drop_duplicates=drop)
seconds = time.perf_counter() - start
print(json.dumps({
    'seconds': seconds,
    'records': sum(s['count'] for s in manifest['splits'].values()),
    'dropped': manifest['duplicates'].get('dropped', {}).get('count', 0),
    'parent_peak_mib': vm_hwm_mib(),
    'worker_peak_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
'''


# The HDF5 source, also in a fresh interpreter: its peak memory against the
# size of x shows whether the split is streamed or loaded.
_H5_CONVERTER = r'''
import json, sys, time
from pcam_tfdata.convert import from_h5, pcam_h5
def vm_hwm_mib():
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) for l in f if l.startswith('VmHWM')) / 1024
start = time.perf_counter()
source = pcam_h5.read_source(sys.argv[1])
manifest = from_h5.convert(source, sys.argv[2], crop_size=int(sys.argv[3]), eda=False,
                              show_progress=False, log=lambda _: None,
                              drop_duplicates=sys.argv[4] == 'drop')
print(json.dumps({'seconds': time.perf_counter() - start,
                  'records': sum(s['count'] for s in manifest['splits'].values()),
                  'peak_mib': vm_hwm_mib()}))
'''


def make_h5(folder, count, gz, marks='crop'):
  """A PCam-layout train split of `count` synthetic patches, written in blocks.

  The patches repeat 256 drawn ones, each labelled as drawn. `marks` says
  where two bytes of each patch's index go: 'crop', in the centre pixel
  (inside every crop): no duplicate of either kind; 'border', in a corner
  only: no identical patches, but every stored crop is one of 256; 'none':
  every patch is one of 256.
  """
  import gzip  # pylint: disable=g-import-not-at-top
  import h5py  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  pool = np.stack([synthetic.make_patch(np.random.default_rng(i), i % 2) for i in range(256)])
  x_path = os.path.join(folder, 'camelyonpatch_level_2_split_train_x.h5')
  y_path = os.path.join(folder, 'camelyonpatch_level_2_split_train_y.h5')
  drawn = rng.integers(0, len(pool), count)
  with h5py.File(x_path, 'w') as f:
    x = f.create_dataset('x', (count, 96, 96, 3), np.uint8, chunks=(32, 96, 96, 3))
    for lo in range(0, count, 1024):
      hi = min(lo + 1024, count)
      block = pool[drawn[lo:hi]]
      if marks != 'none':
        at = 48 if marks == 'crop' else 0
        block[:, at, at, 0], block[:, at, at, 1] = np.arange(lo, hi) % 256, np.arange(lo, hi) // 256
      x[lo:hi] = block
  with h5py.File(y_path, 'w') as f:
    # Labels as drawn: copies agree, so --drop_duplicates keeps one of each.
    f.create_dataset('y', data=(drawn % 2).astype(np.uint8).reshape(-1, 1, 1, 1))
  if gz:
    for path in (x_path, y_path):
      with open(path, 'rb') as src, gzip.open(path + '.gz', 'wb', compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
      os.remove(path)


def read_h5_arrays(folder):
  """Plain h5py: every block of x read once, nothing else."""
  import h5py  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  with h5py.File(os.path.join(folder, 'camelyonpatch_level_2_split_train_x.h5'), 'r') as f:
    x = f['x']
    for lo in range(0, x.shape[0], 2048):
      x[lo:lo + 2048]
    n = x.shape[0]
  return n / (time.perf_counter() - start)


def h5_converter(folder, out_dir, crop, drop=False):
  shutil.rmtree(out_dir, ignore_errors=True)
  proc = subprocess.run([sys.executable, '-c', _H5_CONVERTER, folder, out_dir, str(crop),
                         'drop' if drop else 'keep'],
                        capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_h5(work, count, crop, repeats):
  """images/s of plain h5py reads and of the HDF5 source (plain and gzipped)."""
  plain, zipped = os.path.join(work, 'h5'), os.path.join(work, 'h5gz')
  repeated, bordered = os.path.join(work, 'h5dup'), os.path.join(work, 'h5border')
  make_h5(plain, count, gz=False)
  make_h5(zipped, count, gz=True)
  make_h5(repeated, count, gz=False, marks='none')
  make_h5(bordered, count, gz=False, marks='border')
  cases = (('plain .h5', plain), ('gzip .h5.gz', zipped),
           ('plain .h5, --drop_duplicates', plain),
           ('plain .h5, every patch one of 256 (all confirmed)', repeated),
           ('plain .h5, other borders, every stored crop one of 256 (all confirmed)', bordered),
           ('plain .h5, other borders, every stored crop one of 256, --drop_duplicates',
            bordered))
  reads, runs = [], {name: [] for name, _ in cases}
  for _ in range(repeats):
    reads.append(read_h5_arrays(plain))
    for name, folder in cases:
      runs[name].append(h5_converter(folder, os.path.join(work, 'h5rec'), crop,
                                     drop='--drop_duplicates' in name))
  x_mib = count * 96 * 96 * 3 / 2**20
  print(f'\nPCam HDF5 source: {count} patches ({x_mib:,.0f} MiB of x), crop {crop}, '
        f'median of {repeats}')
  print('| method | images/s | x plain h5py read | peak RSS MiB |')
  print('|---|---:|---:|---:|')
  floor = statistics.median(reads)
  print(f'| plain h5py: read x in blocks of 2048 | {floor:,.0f} | 1.00 | |')
  result = {'h5py_read': floor}
  for name, rows in runs.items():
    rate = statistics.median(count / r['seconds'] for r in rows)
    peak = max(r['peak_mib'] for r in rows)
    print(f'| converter, {name} | {rate:,.0f} | '
          f'{rate / floor:.2f} | {peak:,.0f} |')
    result[name] = {'images_per_second': rate, 'peak_rss_mib': peak}
  return result


def _paths(source):
  """Every file the converter converts: the labelled ones in train/, and test/."""
  return sorted([source.train_path(i) for i in source.ids] +
                [source.test_path(i) for i in source.test_ids])


def _read_all(paths):
  total = 0
  for p in paths:
    with open(p, 'rb') as f:
      total += len(f.read())
  return total


def read_floor(paths, workers=1):
  """Seconds to read every file's bytes once, in `workers` processes (as the converter has).

  The files are split into contiguous chunks, a few per process, as the
  converter's shards are; the pool is started before the clock, as the
  converter's own start-up is part of its time but a read floor has none.
  """
  if workers == 1:
    start = time.perf_counter()
    _read_all(paths)
    return time.perf_counter() - start
  k = 4 * workers
  chunks = [paths[i * len(paths) // k:(i + 1) * len(paths) // k] for i in range(k)]
  # spawn: this process has TensorFlow's threads, which a fork would copy mid-lock.
  with multiprocessing.get_context('spawn').Pool(workers) as pool:
    pool.map(abs, range(workers))  # Every process up.
    start = time.perf_counter()
    pool.map(_read_all, chunks)
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


def converter(data_dir, out_dir, crop, workers, drop=False):
  shutil.rmtree(out_dir, ignore_errors=True)
  proc = subprocess.run([sys.executable, '-c', _CONVERTER, data_dir, out_dir, str(crop), str(workers),
                         'drop' if drop else 'keep'],
                        capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  cli.import_tensorflow()  # Before anything imports it: no start-up chatter in the tables.
  work = _WORK_DIR.value or tempfile.mkdtemp(prefix='bench_convert_')
  data_dir = _DATA_DIR.value
  if data_dir is None:
    data_dir = os.path.join(work, 'kaggle')
    shutil.rmtree(data_dir, ignore_errors=True)
    print(f'generating {_NUM_FILES.value} Kaggle-format TIFFs in {data_dir} ...')
    synthetic.make_dataset(data_dir, num_train=_NUM_FILES.value, num_test=0,
                           show_progress=False)
  source = kaggle.read_source(data_dir)
  paths = _paths(source)
  labels = dict(zip(source.ids, source.labels.tolist()))
  labels.update((i, schema.TEST_LABEL) for i in source.test_ids)
  n = len(paths)
  one, many = 'converter, 1 worker', f'converter, {_WORKERS.value} workers'
  drop = f'{many}, --drop_duplicates'
  floor = f'read floor, {_WORKERS.value} processes (as many as the converter)'
  processes = {'read floor, 1 process': 1, floor: _WORKERS.value, 'naive loop': 1, one: 1,
               many: _WORKERS.value, drop: _WORKERS.value}
  times = {name: [] for name in processes}
  memory = []
  for _ in range(_REPEATS.value):  # Interleaved, so drift on a shared machine hits them all.
    times['read floor, 1 process'].append(read_floor(paths))
    times[floor].append(read_floor(paths, _WORKERS.value))
    times['naive loop'].append(naive_loop(paths, labels, os.path.join(work, 'naive.tfrecord'),
                                          _CROP_SIZE.value))
    for name, workers in ((one, 1), (many, _WORKERS.value), (drop, _WORKERS.value)):
      result = converter(data_dir, os.path.join(work, 'records'), _CROP_SIZE.value, workers,
                         drop=name == drop)
      if result['records'] + result['dropped'] != n:  # Every file converted (or dropped).
        sys.exit(f'bench_convert.py: error: the converter wrote {result["records"]} records '
                 f'and dropped {result["dropped"]} of the {n} files in {data_dir}')
      times[name].append(result['seconds'])
      if name == many:
        memory.append(result)
  rates = {k: n / statistics.median(v) for k, v in times.items()}
  peak_parent = max(m['parent_peak_mib'] for m in memory)
  peak_worker = max(m['worker_peak_mib'] for m in memory)
  print(f'\n{n} files, crop {_CROP_SIZE.value}, median of {_REPEATS.value}; '
        f'{hostinfo.describe()}')
  print('| method | processes | images/s | x naive loop | x read floor (same processes) |')
  print('|---|---:|---:|---:|---:|')
  for name, rate in rates.items():
    same = rates[floor if processes[name] > 1 else 'read floor, 1 process']
    print(f'| {name} | {processes[name]} | {rate:,.0f} | {rate / rates["naive loop"]:.1f} | '
          f'{rate / same:.2f} |')
  print(f'\nconverter peak RSS: main process {peak_parent:.0f} MiB, largest worker '
        f'{peak_worker:.0f} MiB, at most {peak_parent + _WORKERS.value * peak_worker:.0f} MiB '
        'in all')
  h5 = bench_h5(work, _H5_PATCHES.value, _CROP_SIZE.value, _REPEATS.value) if _H5_PATCHES.value else None
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'host': hostinfo.describe(), 'files': n, 'crop_size': _CROP_SIZE.value,
                 'workers': _WORKERS.value,
                 'seconds': times, 'images_per_second': rates,
                 'peak_rss_mib': {'main': peak_parent, 'worker': peak_worker}, 'h5': h5},
                f, indent=1)
  if not _WORK_DIR.value:
    shutil.rmtree(work)


if __name__ == '__main__':
  app.run(main)
