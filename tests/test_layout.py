"""The shape of the code: two halves, small modules, and a converter that never needs TensorFlow."""

import ast
import configparser
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, user_env

PACKAGE = ROOT / 'pcam_tfdata'
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# What the converter's half may import of the package: itself, the shared schema and
# handle, the progress display, the folder lock and the file access (TF-free locally).
_CONVERTER_MAY_IMPORT = ('pcam_tfdata.convert', 'pcam_tfdata.schema', 'pcam_tfdata.records',
                         'pcam_tfdata.progress', 'pcam_tfdata.folderlock', 'pcam_tfdata.fs')
_TENSORFLOW = ('tensorflow', 'keras')


def _modules():
  return sorted(PACKAGE.rglob('*.py'))


def _imports(path, lazy=True):
  """Every module name `path` imports: at any depth (lazy imports too), or at module level."""
  names = []
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree) if lazy else tree.body:
    if isinstance(node, ast.Import):
      names.extend(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.extend([node.module] + [f'{node.module}.{a.name}' for a in node.names])
  return names


@pytest.mark.parametrize('path', _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
  lines = path.read_text().count('\n')
  assert lines <= MAX_MODULE_LINES, f'{path}: {lines} lines'
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      length = node.end_lineno - node.lineno + 1
      assert length <= MAX_FUNCTION_LINES, f'{path}:{node.lineno} {node.name}: {length} lines'


@pytest.mark.parametrize('path', sorted((PACKAGE / 'convert').glob('*.py')) + [
    PACKAGE / 'schema.py', PACKAGE / 'records.py', PACKAGE / 'progress.py'],
                         ids=lambda p: p.name)
def test_the_converters_half_imports_neither_tensorflow_nor_the_training_half(path):
  # The shared modules may import TensorFlow inside a function the converter
  # never calls (schema.feature_spec, the readers' parse spec).
  for name in _imports(path, lazy=path.parent.name == 'convert'):
    assert name.split('.')[0] not in _TENSORFLOW, f'{path}: imports {name}'
    if name.startswith('pcam_tfdata.'):
      assert name.startswith(_CONVERTER_MAY_IMPORT), f'{path}: imports {name}'


def test_the_converter_converts_with_tensorflow_unimportable(kaggle_dir, tmp_path):
  """tools/make_records.py end to end, in worker processes, with TensorFlow and Keras broken.

  Packages named tensorflow and keras that raise on import come first on
  PYTHONPATH, so the worker processes, however they start, have them too.
  """
  blocked = tmp_path / 'blocked'
  for name in _TENSORFLOW:
    (blocked / name).mkdir(parents=True)
    (blocked / name / '__init__.py').write_text(
        f'raise ImportError("{name} is unimportable in this test")\n')
  env = user_env(PYTHONPATH=str(blocked))
  out = tmp_path / 'rec'
  proc = subprocess.run([sys.executable, 'tools/make_records.py', f'--data_dir={kaggle_dir}',
                         f'--out_dir={out}', '--per_class=0', '--workers=2',
                         '--drop_duplicates'], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  manifest = json.loads((out / 'manifest.json').read_text())
  assert sum(s['count'] for s in manifest['splits'].values()) == 70  # Every patch written,
  assert (out / 'eda_samples.png').is_file()  # with its pictures.
  # And the blocker works: importing TensorFlow in that environment fails.
  probe = subprocess.run([sys.executable, '-c', 'import tensorflow'], capture_output=True,
                         text=True, env=env, timeout=60)
  assert 'tensorflow is unimportable in this test' in probe.stderr


def test_every_package_folder_is_listed_in_setup_cfg():
  """setup.cfg lists the packages by hand (its configs mapping); one missing would leave a wheel
  without it."""
  config = configparser.ConfigParser()
  config.read(ROOT / 'setup.cfg')
  listed = set(config['options']['packages'].split())
  folders = {str(p.parent.relative_to(ROOT)).replace(os.sep, '.')
             for p in (ROOT / 'pcam_tfdata').rglob('__init__.py')}
  assert listed == folders | {'pcam_tfdata.configs'}
