"""One writer per folder: a run's --model_dir, a conversion's --out_dir (pcam_tfdata/folderlock.py)."""

import csv
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from pcam_tfdata import folderlock
from pcam_tfdata.convert import outdir
from conftest import ROOT, run_convert, run_tool, user_env

# Another process holding a folder's lock (as a live run would): prints its
# pid once it holds it, then sleeps until killed.
_HOLDER = r'''
import sys, time
from pcam_tfdata import folderlock
folderlock.FolderLock(sys.argv[1], 'held').acquire()
print('holding', flush=True)
time.sleep(3600)
'''


@pytest.fixture
def holder():
  """fn(lock_path) -> a live process holding that lock (killed at the end)."""
  procs = []

  def hold(lock_path):
    proc = subprocess.Popen([sys.executable, '-c', _HOLDER, str(lock_path), 'pcam-train',
                             '--model_dir=elsewhere'], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    procs.append(proc)
    assert proc.stdout.readline() == 'holding\n'
    return proc

  yield hold
  for proc in procs:
    proc.kill()
    proc.wait()
    proc.stdout.close()


def _config(records, model_dir, **kwargs):
  """A quick seeded run's Config (one epoch of the tiny records on one device)."""
  train = importlib.import_module('pcam_tfdata.train')
  settings = dict(records_dir=str(records), model_dir=str(model_dir), epochs=1, batch_size=8,
                  eval_batch_size=16, mixed_precision='off', strategy='default', seed=1,
                  progress=False)
  return train.Config(**{**settings, **kwargs})


def _holder_named(message, proc):
  return (f'(host {socket.gethostname()}, process {proc.pid}: -c {proc.args[3]} pcam-train '
          '--model_dir=elsewhere)') in message


def test_a_second_holder_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(
    tmp_path, holder):
  path = tmp_path / '.lock'
  first = holder(path)
  with pytest.raises(folderlock.FolderBusy) as e:
    folderlock.FolderLock(str(path), '--model_dir=x').acquire()
  message = str(e.value)
  assert re.match(r'--model_dir=x: in use by another run since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d '
                  r'UTC \(host ', message) and _holder_named(message, first), message
  assert message.endswith('wait for it to end (or stop it), or choose another folder')
  first.send_signal(signal.SIGKILL)  # As kill -9 or a power cut: nothing given back.
  first.wait()
  said = []
  with folderlock.FolderLock(str(path), '--model_dir=x', log=said.append):
    assert json.loads(path.read_text())['pid'] == os.getpid()  # Ours now.
    assert len(said) == 1 and said[0].startswith('--model_dir=x: taking over the lock of a run '
                                                 'that ended without giving it back since ')
    assert _holder_named(said[0], first)
    with pytest.raises(folderlock.FolderBusy, match='in use by another run in this process'):
      folderlock.FolderLock(str(path), '--model_dir=x').acquire()  # (A notebook's second run.)
  assert not path.exists()  # Given back as usual: the next holder takes it quietly.
  said.clear()
  with folderlock.FolderLock(str(path), '--model_dir=x', log=said.append):
    pass
  assert said == []


def test_a_run_into_a_folder_another_run_holds_is_refused_before_it_writes(records, tmp_path,
                                                                           holder, capsys):
  train = importlib.import_module('pcam_tfdata.train')
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  first = holder(model_dir / folderlock.LOCK_NAME)
  config = _config(records, model_dir)
  with pytest.raises(folderlock.FolderBusy) as e:
    train.run(config)
  assert str(e.value).startswith(f'--model_dir={model_dir}: in use by another run since ')
  assert _holder_named(str(e.value), first)
  assert sorted(p.name for p in model_dir.iterdir()) == [folderlock.LOCK_NAME]  # Nothing else.
  first.kill()  # A holder killed mid-run does not block the rerun.
  first.wait()
  capsys.readouterr()
  train.run(config)
  assert 'taking over the lock of a run that ended without giving it back' in (
      capsys.readouterr().out)
  with open(model_dir / 'history.csv') as f:
    assert [r['epoch'] for r in csv.DictReader(f)] == ['1']
  assert not (model_dir / folderlock.LOCK_NAME).exists()  # Given back at the end.


def test_the_lock_is_held_until_the_final_evaluation_is_written(records, tmp_path, monkeypatch):
  """A second run started while the first evaluates (here: in the same process) is refused;
  the folder holds the first run's files alone."""
  train = importlib.import_module('pcam_tfdata.train')
  from pcam_tfdata.training import epochs  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path / 'run'
  real = epochs.EpochLoop.final_evaluation
  refused = []

  def second_run_meanwhile(self, *args, **kwargs):
    with pytest.raises(folderlock.FolderBusy) as e:
      train.run(_config(records, model_dir, model='batchnorm', restart=True))
    refused.append(str(e.value))
    return real(self, *args, **kwargs)

  monkeypatch.setattr(epochs.EpochLoop, 'final_evaluation', second_run_meanwhile)
  metrics = train.run(_config(records, model_dir))
  assert refused == [f'--model_dir={model_dir}: in use by another run in this process; wait '
                     'for it to end, or choose another folder']
  assert metrics['model'] == 'baseline' and json.loads(
      (model_dir / 'metrics.json').read_text())['model'] == 'baseline'
  with open(model_dir / 'history.csv') as f:
    assert [r['epoch'] for r in csv.DictReader(f)] == ['1']


def test_a_conversion_into_a_folder_another_holds_is_one_line_and_writes_nothing(
    kaggle_dir, tmp_path, holder):
  out = tmp_path / 'out' / 'rec'
  out.parent.mkdir()
  first = holder(out.parent / '.rec.lock')
  proc = run_tool('tools/make_records.py', f'--data_dir={kaggle_dir}', f'--out_dir={out}',
                  '--per_class=0')
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f'make_records.py: error: --out_dir={out}: in use by another run since '), proc.stderr
  assert _holder_named(lines[0], first)
  assert sorted(os.listdir(tmp_path / 'out')) == ['.rec.lock']  # No work folder, no output.
  first.kill()
  first.wait()
  manifest = run_convert(kaggle_dir, out)  # The library's path: the same lock, taken over.
  assert manifest['splits']['train']['count'] > 0
  assert sorted(os.listdir(tmp_path / 'out')) == ['rec']  # (The lock given back.)


def test_two_names_of_one_output_folder_share_its_lock(tmp_path):
  (tmp_path / 'real').mkdir()
  os.symlink(tmp_path / 'real', tmp_path / 'link')
  with outdir.lock(str(tmp_path / 'real' / 'rec')):
    with pytest.raises(folderlock.FolderBusy, match=r'^--out_dir=\S+/link/rec: in use'):
      outdir.lock(str(tmp_path / 'link' / 'rec')).acquire()


def test_only_the_chief_takes_the_lock_the_other_workers_never_wait_on_it(records, tmp_path,
                                                                          holder, monkeypatch):
  """A worker that is not the chief trains while the chief (here: another process) holds it."""
  train = importlib.import_module('pcam_tfdata.train')
  from pcam_tfdata.training import distribute  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  chief = holder(model_dir / folderlock.LOCK_NAME)
  monkeypatch.setattr(distribute, 'is_chief', lambda strategy: False)
  assert train.run(_config(records, model_dir)) == {}
  assert json.loads((model_dir / folderlock.LOCK_NAME).read_text())['pid'] == chief.pid
