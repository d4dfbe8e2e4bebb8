"""Shared fixtures: tiny Kaggle-layout folders and their conversions."""

import os
import pathlib
import subprocess
import sys

import pytest

from pcam_tfdata import convert
from pcam_tfdata import kaggle
from pcam_tfdata import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Real PCam patches live beside the project, never inside it; a user's clone
# has no ../shared, and the tests that need them skip.
REAL_PATCHES = ROOT.parent / 'shared' / 'fixtures' / 'real_patches'


def pytest_configure(config):
  """Two logical CPU devices, so MirroredStrategy runs (and is tested) without GPUs.

  Must happen before TensorFlow starts its runtime, hence here.
  """
  del config
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  cpu = tf.config.list_physical_devices('CPU')[0]
  tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


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
  import shutil  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'pcam'
  shutil.copytree(kaggle_dir, path)
  return path


def run_convert(data_dir, out_dir, **kwargs):
  """convert.convert with quiet defaults for tests."""
  kwargs.setdefault('per_class', 0)
  kwargs.setdefault('eda', False)
  kwargs.setdefault('log', lambda _: None)
  source = kaggle.read_source(str(data_dir), allow_missing=kwargs.get('skip_bad', False))
  return convert.convert(source, str(out_dir), show_progress=False, **kwargs)


def run_tool(*args, timeout=300, cwd=ROOT):
  """Runs a tools/ script in a fresh interpreter; returns CompletedProcess."""
  return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=cwd,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
