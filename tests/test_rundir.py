"""Run files: written whole or not at all; the best model in step with the backup."""

import os

from pcam_tfdata import rundir


def test_write_atomic_leaves_the_file_and_no_temporary(tmp_path):
  path = tmp_path / 'metrics.json'
  rundir.write_atomic(str(path), '{"a": 1}\n')
  rundir.write_atomic(str(path), '{"a": 2}\n')
  assert path.read_text() == '{"a": 2}\n' and os.listdir(tmp_path) == ['metrics.json']


def test_history_rows_round_trip(tmp_path):
  path = str(tmp_path / 'history.csv')
  rundir.write_history(path, [{'epoch': 1, 'x': 0.5}, {'epoch': 2, 'x': 0.25}], ('epoch', 'x'))
  assert rundir.read_history(path) == [{'epoch': '1', 'x': '0.5'}, {'epoch': '2', 'x': '0.25'}]
  assert rundir.read_history(str(tmp_path / 'absent.csv')) == []


def _files(model_dir):
  return sorted(os.listdir(model_dir))


def _pending(model_dir, epoch, text):
  with open(rundir.pending_best(str(model_dir), epoch), 'w') as f:
    f.write(text)


def test_a_best_model_the_backup_recorded_is_committed_on_restart(tmp_path):
  (tmp_path / 'model.keras').write_text('epoch 1')
  _pending(tmp_path, 3, 'epoch 3')  # Killed after the epoch-3 backup, before the rename.
  rundir.settle_best(str(tmp_path), last_epoch=3, best_epoch=3)
  assert _files(tmp_path) == ['model.keras'] and (tmp_path / 'model.keras').read_text() == 'epoch 3'


def test_a_best_model_the_backup_never_saw_is_dropped_on_restart(tmp_path):
  (tmp_path / 'model.keras').write_text('epoch 1')
  _pending(tmp_path, 3, 'epoch 3')  # Killed before the epoch-3 backup: restored epoch 2.
  (tmp_path / 'metrics.json.tmp-77').write_text('{')  # And a write killed before its rename.
  rundir.settle_best(str(tmp_path), last_epoch=2, best_epoch=1)
  assert _files(tmp_path) == ['model.keras'] and (tmp_path / 'model.keras').read_text() == 'epoch 1'


def test_commit_moves_only_that_epochs_model(tmp_path):
  _pending(tmp_path, 2, 'epoch 2')
  rundir.commit_best(str(tmp_path), 3)  # Epoch 3 did not improve: nothing to move.
  assert _files(tmp_path) == ['.best-epoch2.keras']
  rundir.commit_best(str(tmp_path), 2)
  assert _files(tmp_path) == ['model.keras']
