"""Records and runs on any filesystem TensorFlow reads: TF's in-memory ram:// stands in for a bucket.

ram:// lives in one process, so train, predict, verify and report run here,
in process, and an audit hook (Python's own record of every file opened for
writing, folder made, renamed or removed) shows what reached the local disk.
"""

import json
import os
import sys
import tempfile
import uuid

import numpy as np
import pytest
import tensorflow as tf

from pcam_tfdata import fs
from pcam_tfdata import records as records_lib
from pcam_tfdata import report
from pcam_tfdata import rundir
from pcam_tfdata.convert import api as convert_api
from pcam_tfdata.convert import plan
from pcam_tfdata.training import api
from pcam_tfdata.training import submission
from pcam_tfdata.training import verify

_WRITES = ('os.mkdir', 'os.rename', 'os.replace', 'os.remove', 'os.rmdir', 'shutil.rmtree',
           'shutil.copyfile', 'os.truncate', 'os.symlink', 'os.link')
_watch = []  # While a list is here, the hook appends to it (a hook cannot be removed).


def _hook(event, args):
  if not _watch:
    return
  if event == 'open' and isinstance(args[0], (str, bytes, os.PathLike)):
    mode = args[1] if isinstance(args[1], str) else ''
    flags_ = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
    if any(c in mode for c in 'wax+') or flags_ & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
      _watch[0].append((event, os.fsdecode(args[0])))
  elif event in _WRITES:
    if event in ('os.remove', 'os.rmdir') and args[1] is not None:
      return  # Relative to a dir_fd: inside the tree a shutil.rmtree event names.
    _watch[0].append((event, os.fsdecode(args[0]) if args and args[0] is not None else ''))


sys.addaudithook(_hook)


@pytest.fixture
def local_writes(tmp_path, monkeypatch):
  """The local paths written while the test runs, and the scratch folder TF and Keras get.

  Python's temporary folder is pointed at a fresh one: AutoGraph writes the
  modules it generates there, and Keras its scratch folder while it zips a
  .keras file; anything else written locally is the project's doing.
  """
  scratch = tmp_path / 'scratch'
  scratch.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
  monkeypatch.chdir(tmp_path)
  writes = []
  _watch.append(writes)
  yield writes, scratch
  _watch.clear()


def _ram_copy(folder):
  """The local records folder copied to a fresh ram:// folder (its URL)."""
  url = f'ram://{uuid.uuid4().hex}/rec'
  tf.io.gfile.makedirs(url)
  for name in os.listdir(folder):
    tf.io.gfile.copy(os.path.join(folder, name), fs.join(url, name))
  return url


def test_train_predict_verify_and_report_on_ram_write_nothing_locally(records, local_writes,
                                                                     capsys):
  """The issue's bar: records copied to ram://, a run there, resumed, predicted, reported."""
  writes, scratch = local_writes
  rec = _ram_copy(records)  # (Before the watch: the copy reads the local folder.)
  writes.clear()
  run = rec.replace('/rec', '/run')
  options = dict(batch_size=8, eval_batch_size=16, mixed_precision='off', strategy='default',
                 seed=1, progress=False, augment=True)
  api.train(rec, run, epochs=1, **options)
  metrics = api.train(rec, run, epochs=2, **options)  # Resumed from the backup in ram://.
  out = capsys.readouterr().out
  assert f'resuming after epoch 1 from {run}/backup' in out
  with tf.io.gfile.GFile(f'{run}/metrics.json') as f:
    saved = json.load(f)
  assert saved['val_auc'] == metrics['val_auc'] and saved['epochs_run'] == 2
  assert saved['records_dir'] == rec  # A URL stays a URL.
  assert sorted(tf.io.gfile.listdir(run)) == [
      'backup', 'confusion_matrix.png', 'history.csv', 'metrics.json', 'model.keras',
      'roc_curve.png', 'tensorboard', 'training_curves.png']
  with tf.io.gfile.GFile(f'{run}/history.csv') as f:
    assert [line.split(',')[0] for line in f.read().splitlines()] == ['epoch', '1', '2']
  with tf.io.gfile.GFile(f'{run}/roc_curve.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  ids, probs = api.predict(run, rec)[:2]
  assert len(ids) == records_lib.Records.open(rec).count('test') == 10
  # The same model read from a local copy predicts the same.
  assert np.isfinite(probs).all()
  assert verify.verify(rec, log=lambda _: None) == 70
  table = report.table([run])
  assert f'| {saved["best_epoch"]} | float32 | 1 |' in table

  # What the commands do with their outputs, in this process (ram:// is per process):
  # predict's --output check (its folder writable) and submission, and the report.
  # (Not through predict's main: its flags and train's share names in one process.)
  output = fs.join(rec.replace('/rec', ''), 'submission.csv')
  rundir.check_writable(fs.dirname(output))
  submission.write_submission(ids, probs, output)
  with tf.io.gfile.GFile(output) as f:
    rows = f.read().splitlines()
  assert rows[0] == 'id,label' and sorted(r.split(',')[0] for r in rows[1:]) == sorted(ids)
  assert not tf.io.gfile.exists(output + '.partial')
  report.main(['report', run])
  assert table in capsys.readouterr().out

  ours = [path for _, path in writes if not os.path.abspath(path).startswith(str(scratch))]
  assert ours == [], ours  # Nothing of the run, nor of TF or Keras, outside their scratch.
  left = sorted(p.name for p in scratch.rglob('*') if p.is_file())
  # AutoGraph's generated modules stay until the process ends; nothing of the run's.
  assert all(n.startswith('__autograph_generated_file') and n.endswith(('.py', '.pyc'))
             for n in left), left
  assert not os.listdir(os.getcwd()) or os.listdir(os.getcwd()) == ['scratch']


def test_a_missing_records_url_or_model_is_one_line(records):
  missing = f'ram://{uuid.uuid4().hex}/rec'
  with pytest.raises(ValueError, match=rf'^{missing}: no such records folder$'):
    records_lib.Records.open(missing)
  tf.io.gfile.makedirs(missing)
  with pytest.raises(ValueError, match=rf'^{missing}/manifest.json: missing; the folder is not'):
    records_lib.Records.open(missing)
  with pytest.raises(ValueError, match=rf'^{missing}/model.keras: no such model \(train first\)$'):
    api.predict(missing, records)
  # A listed shard gone from the bucket: named before any training.
  rec = _ram_copy(records)
  tf.io.gfile.remove(f'{rec}/val-00001-of-00004.tfrecord')
  with pytest.raises(ValueError, match=rf"^{rec}/manifest.json: split 'val' names missing shard "
                                       r'val-00001-of-00004.tfrecord$'):
    records_lib.Records.open(rec)


@pytest.mark.parametrize('flag', ['out_dir', 'data_dir'])
def test_the_converter_refuses_a_url_saying_to_convert_locally_and_copy(tmp_path, flag):
  paths = {'data_dir': str(tmp_path / 'pcam'), 'out_dir': str(tmp_path / 'rec'),
           flag: 'gs://bucket/pcam'}
  with pytest.raises(plan.ConvertError, match=rf'^--{flag}=gs://bucket/pcam: the converter reads '
                                              r'and writes local folders; convert into a local '
                                              r'one, then copy it \(gsutil -m cp -r'):
    convert_api.make_records(paths['data_dir'], paths['out_dir'])
  assert not os.listdir(tmp_path)  # Refused before anything was made.


def test_fs_keeps_urls_whole_and_local_paths_local(tmp_path):
  assert fs.join('gs://b/runs', 'a', 'metrics.json') == 'gs://b/runs/a/metrics.json'
  assert fs.basename('s3://b/rec/') == 'rec' and fs.dirname('gs://b/rec/x.csv') == 'gs://b/rec'
  assert fs.abspath('ram://r') == 'ram://r' and fs.abspath('r') == os.path.join(os.getcwd(), 'r')
  # A file at a URL's root: its folder is the root, not a local 'ram:'.
  assert fs.dirname('ram://sub.csv') == 'ram://' and fs.dirname('gs://b/x.csv') == 'gs://b'
  assert fs.is_url('hdfs://nn:8020/x') and not fs.is_url('/tmp/gs://x') and not fs.is_url('a:b')
  url = f'ram://{uuid.uuid4().hex}'
  for folder in (url, str(tmp_path)):
    fs.makedirs(fs.join(folder, 'sub'))
    fs.write_text(fs.join(folder, '.best-epoch2.keras'), 'new')
    fs.write_text(fs.join(folder, 'model.keras'), 'old')
    fs.write_text(fs.join(folder, 'x.tmp-1'), '')
    assert fs.matching(folder, '.best-epoch*.keras') == [fs.join(folder, '.best-epoch2.keras')]
    fs.replace(fs.join(folder, '.best-epoch2.keras'), fs.join(folder, 'model.keras'))
    assert fs.read_text(fs.join(folder, 'model.keras')) == 'new'
    assert sorted(fs.listdir(folder)) == ['model.keras', 'sub', 'x.tmp-1'], folder
    assert fs.isdir(fs.join(folder, 'sub')) and not fs.isfile(fs.join(folder, 'sub'))
    assert fs.size(fs.join(folder, 'model.keras')) == 3
    assert fs.exists(folder) and fs.exists(fs.join(folder, 'sub')) and fs.isdir(folder)
    rundir.check_writable(fs.join(folder, 'new'))  # Made, written, and left empty.
    assert fs.isdir(fs.join(folder, 'new')) and fs.listdir(fs.join(folder, 'new')) == []
    fs.rmtree(fs.join(folder, 'new'))
    fs.rmtree(fs.join(folder, 'sub'))
    fs.rmtree(fs.join(folder, 'sub'))  # Gone already: nothing.
    assert not fs.exists(fs.join(folder, 'sub'))


def test_fs_lists_a_bucket_folder_without_gfiles_trailing_slashes(monkeypatch):
  """GCS lists sub-folders as 'backup/' (ram:// does not): fs.listdir gives plain names."""
  gfile = tf.io.gfile
  monkeypatch.setattr(gfile, 'listdir', lambda path: ['backup/', 'history.csv'])
  assert fs.listdir('gs://b/run') == ['backup', 'history.csv']
  assert fs.matching('gs://b/run', 'back*') == ['gs://b/run/backup']


def test_a_search_in_a_bucket_is_read_as_a_local_one():
  from pcam_tfdata.tuning import results  # pylint: disable=g-import-not-at-top
  study = f'ram://{uuid.uuid4().hex}/study'
  fs.makedirs(study)
  fs.write_text(fs.join(study, results.TRIALS_CSV), 'number,state\r\n0,COMPLETE\r\n')
  assert results.read_trials(study) == [{'number': '0', 'state': 'COMPLETE'}]
  with pytest.raises(ValueError, match=rf'^{study}x/trials.csv: no search here'):
    results.read_trials(study + 'x')


def test_a_model_in_a_bucket_loads_and_restores_weights_from_memory(local_writes, monkeypatch):
  """Keras would copy a .keras URL to a local temporary file first (through gfile, which
  Python's audit hook does not see: its copy function is watched instead)."""
  from keras.src.utils import file_utils  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import models  # pylint: disable=g-import-not-at-top
  writes, scratch = local_writes
  copies = []
  real_copy = file_utils.copy
  monkeypatch.setattr(file_utils, 'copy', lambda *a, **k: copies.append(a) or real_copy(*a, **k))
  path = f'ram://{uuid.uuid4().hex}/model.keras'
  saved = models.build_model('baseline')
  saved.save(path)
  writes.clear()  # (Keras zips a saved model in its scratch folder.)
  loaded = models.load_model(path)
  other = models.build_model('baseline')
  assert any(not np.array_equal(a, b) for a, b in zip(other.get_weights(), saved.get_weights()))
  models.load_weights(other, path)
  for model in (loaded, other):
    for a, b in zip(model.get_weights(), saved.get_weights()):
      np.testing.assert_array_equal(a, b)
  assert [p for _, p in writes if not p.startswith(str(scratch))] == []
  assert copies == []  # No local copy of the file.
