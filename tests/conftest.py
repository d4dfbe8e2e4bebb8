"""Shared fixtures: tiny Kaggle-layout folders and their conversions."""

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import pytest

from pcam_tfdata.convert import from_kaggle
from pcam_tfdata.convert import kaggle
from pcam_tfdata.convert import synthetic
from pcam_tfdata import records as records_lib
from pcam_tfdata import schema

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Real PCam patches live beside the project, never inside it; a user's clone
# has no ../shared, and the tests that need them skip.
REAL_PATCHES = ROOT.parent / 'shared' / 'fixtures' / 'real_patches'


def pytest_configure(config):
  """Two logical CPU devices, so MirroredStrategy runs (and is tested) without GPUs.

  Must happen before TensorFlow starts its runtime, hence here.
  """
  del config
  from pcam_tfdata import cli  # pylint: disable=g-import-not-at-top
  # The test run's own output without start-up chatter; its stderr stays pytest's.
  tf = cli.import_tensorflow(whole_run=False)
  cpu = tf.config.list_physical_devices('CPU')[0]
  tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(autouse=True)
def _op_determinism_off_after_each_test():
  """`train.run` with a seed turns TF op determinism on for the process; not for the next test."""
  yield
  from tensorflow.python.framework import config as tf_config  # pylint: disable=g-import-not-at-top
  tf_config.disable_op_determinism()


@pytest.fixture(scope='session')
def mirrored():
  """One MirroredStrategy over the two logical CPUs for the whole session.

  A second strategy in the same process would reuse the first one's collective
  instance keys (and fail with a shape mismatch); a real run has one.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])


@pytest.fixture(scope='session')
def kaggle_dir(tmp_path_factory):
  """A read-only tiny Kaggle folder: 60 labelled patches (24 positive), 10 test."""
  path = tmp_path_factory.mktemp('kaggle') / 'pcam'
  synthetic.make_dataset(str(path), num_train=60, num_test=10, seed=3, show_progress=False)
  return path


@pytest.fixture(scope='session')
def records(kaggle_dir, tmp_path_factory):
  """`kaggle_dir` converted, unbalanced: 48 train, 12 val, 10 test; read-only."""
  out = tmp_path_factory.mktemp('records') / 'rec'
  run_convert(kaggle_dir, out, per_class=0)
  return out


@pytest.fixture
def kaggle_copy(kaggle_dir, tmp_path):
  """A private copy of `kaggle_dir` that a test may break."""
  path = tmp_path / 'pcam'
  shutil.copytree(kaggle_dir, path)
  return path


@contextlib.contextmanager
def once_per_run(tmp_path_factory, name):
  """A folder shared by every test process of this run, and whether to fill it.

  Yields (folder, first): `first` is True in the one process that must
  build what the folder holds (the others wait for it, under a file lock,
  and find it built). Without pytest-xdist, a folder of this process's own.
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # This run's folder, shared by its workers (popen-gw0, popen-gw1).
  folder = base / name
  with open(base / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes, also on failure.
    first = not (folder / '.done').exists()
    if first:
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
    yield folder, first
    if first:
      (folder / '.done').touch()


def run_convert(data_dir, out_dir, **kwargs):
  """convert.convert with quiet defaults for tests."""
  kwargs.setdefault('per_class', 0)
  kwargs.setdefault('eda', False)
  kwargs.setdefault('log', lambda _: None)
  source = kaggle.read_source(str(data_dir), allow_missing=kwargs.get('skip_bad', False))
  return from_kaggle.convert(source, str(out_dir), show_progress=False, **kwargs)


def synthetic_records(base, *, num_train, num_test, seed, **convert):
  """A synthetic Kaggle folder made in `base`/kaggle, converted to `base`/rec (returned)."""
  synthetic.make_dataset(str(base / 'kaggle'), num_train=num_train, num_test=num_test,
                         seed=seed, show_progress=False)
  run_convert(base / 'kaggle', base / 'rec', **convert)
  return base / 'rec'


def read_records(records_dir):
  """{id: (split, label, image bytes)} of every record of a records folder."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  records = records_lib.Records.open(records_dir)
  out = {}
  for split in records.splits:
    ds = tf.data.TFRecordDataset(records.shard_paths(split))
    for r in ds.map(lambda r: tf.io.parse_single_example(r, schema.feature_spec())):
      out[r['id'].numpy().decode()] = (split, int(r['label']), r['image'].numpy())
  return out


def user_env(**overrides):
  """The environment of a user who set no TensorFlow logging variable.

  TF_ENABLE_ONEDNN_OPTS=1 makes TensorFlow on any x86 CPU print the start-up
  lines that hosts with AVX-512/AMX print by default, so what the entry points
  show on stderr is tested under the noisiest start-up on every machine.
  """
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  env['TF_ENABLE_ONEDNN_OPTS'] = '1'
  env.update(overrides)
  return env


def run_tool(*args, timeout=300, cwd=ROOT, env=None):
  """Runs a tools/ script or `-m module` in a fresh interpreter, as a user would."""
  return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=cwd, env=env or user_env())


def error_lines(stderr):
  """The stderr lines that mention an error (case-insensitive)."""
  return [line for line in stderr.splitlines() if 'error' in line.lower()]


def run_in_terminal(*args, timeout=300, cwd=ROOT, env=None):
  """Runs `python *args` with a pseudo-terminal as stdin, stdout and stderr.

  Returns:
    (exit status, everything written to the terminal, as text).
  """
  import pty  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  master, slave = pty.openpty()
  proc = subprocess.Popen([sys.executable, *args], stdin=slave, stdout=slave, stderr=slave,
                          cwd=cwd, env=env or user_env(), close_fds=True)
  os.close(slave)
  chunks = []

  def read():  # As it comes: a full terminal buffer would block the child.
    while True:
      try:
        data = os.read(master, 1 << 16)
      except OSError:  # EIO once the child has closed its end.
        return
      if not data:
        return
      chunks.append(data)

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    reader.join(timeout=10)
    os.close(master)
  return proc.returncode, b''.join(chunks).decode(errors='replace')


def flip_a_byte(records, tmp_path, split):
  """A copy of the records with one byte of the split's first shard flipped."""
  copy = tmp_path / 'rec'
  shutil.copytree(records, copy)
  manifest = json.loads((copy / 'manifest.json').read_text())
  shard = copy / manifest['splits'][split]['shards'][0]['file']
  data = bytearray(shard.read_bytes())
  data[100] ^= 1  # Inside the first record's image.
  shard.write_bytes(bytes(data))
  return copy, shard


def cut_after_first_record(records, tmp_path, split):
  """A copy of the records whose split's first shard of 2+ records ends after its first."""
  copy = tmp_path / 'rec'
  shutil.copytree(records, copy)
  manifest = json.loads((copy / 'manifest.json').read_text())
  shard = copy / next(s['file'] for s in manifest['splits'][split]['shards'] if s['count'] > 1)
  data = shard.read_bytes()
  length = struct.unpack('<Q', data[:8])[0]
  shard.write_bytes(data[:8 + 4 + length + 4])  # A whole record: no read error of its own.
  return copy, shard
