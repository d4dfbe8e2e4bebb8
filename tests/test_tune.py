"""pcam-tune: the space file, the study, trials as ordinary runs, pruning, kills and shared studies."""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

optuna = pytest.importorskip('optuna', reason='the [tune] extra (optuna) is not installed')

import pcam_tfdata as pt  # pylint: disable=g-import-not-at-top
from pcam_tfdata.training import config as config_lib  # pylint: disable=g-import-not-at-top
from pcam_tfdata.tuning import api  # pylint: disable=g-import-not-at-top
from pcam_tfdata.tuning import results  # pylint: disable=g-import-not-at-top
from pcam_tfdata.tuning import space as space_lib  # pylint: disable=g-import-not-at-top
from pcam_tfdata.tuning import study as study_lib  # pylint: disable=g-import-not-at-top
from conftest import ROOT, synthetic_records  # pylint: disable=g-import-not-at-top

TUNE = [sys.executable, '-m', 'pcam_tfdata.tune']
TRAIN = [sys.executable, '-m', 'pcam_tfdata.train']


@pytest.fixture(scope='module')
def small_records(tmp_path_factory):
  """400 demo patches (300 train, 100 val): a trial of 2 epochs takes a second or two."""
  return synthetic_records(tmp_path_factory.mktemp('tune'), num_train=400, num_test=0,
                           seed=11, per_class=0, val_fraction=0.25)


# --- The space file (TF- and Optuna-free checks). ---

def test_a_space_file_parses_every_kind_with_comments_and_blank_lines(tmp_path):
  path = tmp_path / 'seed.space'
  path.write_text('# the seed\n\nlearning_rate: loguniform 1e-4 1e-2  # rates\n'
                  'batch_size: choice 32 64 128\nstain_jitter: uniform 0 0.1\n'
                  'epochs: int 2 5\naugment: choice false true\nlr_schedule: choice cosine plateau\n')
  params = space_lib.read(str(path))
  assert [(p.name, p.kind, p.args, p.line) for p in params] == [
      ('learning_rate', 'loguniform', (1e-4, 1e-2), 3), ('batch_size', 'choice', (32, 64, 128), 4),
      ('stain_jitter', 'uniform', (0.0, 0.1), 5), ('epochs', 'int', (2, 5), 6),
      ('augment', 'choice', (False, True), 7), ('lr_schedule', 'choice', ('cosine', 'plateau'), 8)]
  space_lib.check(params, {})
  distributions = space_lib.distributions(params)
  assert distributions['learning_rate'] == optuna.distributions.FloatDistribution(1e-4, 1e-2,
                                                                                  log=True)
  assert distributions['epochs'] == optuna.distributions.IntDistribution(2, 5)
  assert params[0].text() == 'learning_rate: loguniform 0.0001 0.01'


@pytest.mark.parametrize('line, message', [
    ('learning_rate loguniform 1e-4 1e-2', 'expected NAME: KIND ARGS'),
    ('learning_rat: uniform 0 1', '--learning_rat is not a pcam-train flag'),
    ('seed: int 0 9', '--seed is not searched (the search sets it)'),
    ('records_dir: choice a b', '--records_dir is not searched'),
    ('learning_rate: normal 0 1', "unknown kind 'normal'"),
    ('learning_rate: uniform 0.1', 'uniform takes LOW HIGH, got 1 values'),
    ('learning_rate: uniform 0.1 0.01', 'LOW 0.1 must be below HIGH 0.01'),
    ('learning_rate: loguniform 0 0.1', 'loguniform needs LOW > 0'),
    ('learning_rate: uniform 0 0.1', 'learning_rate=0.0: pcam-train refuses it '
                                     '(--learning_rate=0.0: must be > 0)'),
    ('stain_jitter: uniform 0 1.5', 'stain_jitter=1.5: pcam-train refuses it'),
    ('batch_size: choice 32 big', '--batch_size takes int values, not \'big\''),
    ('batch_size: uniform 16 64', '--batch_size takes whole numbers; use int or choice'),
    ('batch_size: choice 32 32', 'a value is listed twice'),
    ('batch_size: choice 32 0 64', 'batch_size=0: pcam-train refuses it'),  # Every choice.
    ('augment: choice true maybe', '--augment is true or false, not \'maybe\''),
    ('lr_schedule: uniform 0 1', '--lr_schedule takes str values; use choice'),
    ('lr_schedule: choice cosine step', 'lr_schedule=step: pcam-train refuses it'),
    ('learning_rate: uniform 1e-4 inf', "is not a finite number"),
    ('warmup_epochs: uniform 0 20', 'warmup_epochs=20.0: pcam-train refuses it'),
])
def test_a_bad_line_names_the_file_and_line(tmp_path, line, message):
  path = tmp_path / 'bad.space'
  path.write_text(f'# header\nbatch_size: choice 32 64\n{line}\n'
                  if not line.startswith('batch_size') else f'# header\n\n{line}\n')
  with pytest.raises(space_lib.SpaceError) as e:
    space_lib.check(space_lib.read(str(path)), {'epochs': 10})
  assert str(e.value).startswith(f'{path}:3: '), str(e.value)
  assert message in str(e.value), str(e.value)


def test_values_are_checked_with_the_fixed_flags_beside_them():
  params = space_lib.parse('warmup_epochs: uniform 0 2\n', 'w.space')
  space_lib.check(params, {'epochs': 3})
  with pytest.raises(space_lib.SpaceError, match=r'^w.space:1: warmup_epochs=2.0: pcam-train '
                                                 r'refuses it \(--warmup_epochs=2.0: must be >= 0 '
                                                 r'and below --epochs=1\)'):
    space_lib.check(params, {'epochs': 1})


def test_the_same_search_spelled_with_or_without_its_defaults_is_the_same_study(small_records,
                                                                                tmp_path):
  space = {'learning_rate': 'loguniform 1e-4 1e-2'}
  plans = [api.make_plan(str(small_records), str(tmp_path / 's'), space=space, trials=2,
                         log=lambda _: None, **fixed)[0]
           for fixed in ({'epochs': 2}, {'epochs': 2, 'batch_size': 64, 'dropout': None})]
  assert plans[0].fixed == plans[1].fixed and plans[0].fixed['batch_size'] == 64
  assert 'learning_rate' not in plans[0].fixed and 'seed' not in plans[0].fixed


def test_each_trial_draws_afresh_and_the_same_history_draws_the_same():
  def first_draw(*args):
    study = optuna.create_study(sampler=study_lib.make_sampler('tpe', *args))
    return study.ask().suggest_float('x', 0, 1)
  draws = [first_draw(0, k) for k in range(5)]
  assert len(set(draws)) == 5  # A new trial count, a new point.
  assert first_draw(0, 3) == draws[3] and first_draw(1, 3) != draws[3]
  assert first_draw(0, 3, '1') != draws[3]  # Two workers counting the same trials.


def test_a_study_dir_serves_one_study(tmp_path):
  url = study_lib.default_storage(tmp_path)
  study_lib.bind_study_dir(str(tmp_path), url, 'a', record=False)
  assert not (tmp_path / study_lib.STUDY_JSON).exists()
  study_lib.bind_study_dir(str(tmp_path), url, 'a')
  study_lib.bind_study_dir(str(tmp_path), url, 'a')  # The same: fine.
  with pytest.raises(ValueError, match=rf"^--study_dir={tmp_path} holds the trials of study 'a' "
                                       rf"in {url}, not 'b' in {url}: trial folders are "
                                       r'numbered per study; use another --study_dir$'):
    study_lib.bind_study_dir(str(tmp_path), url, 'b')


def test_a_flag_searched_twice_or_none_at_all_is_refused(tmp_path):
  with pytest.raises(space_lib.SpaceError, match=r':3: --dropout is already searched on line 1'):
    space_lib.parse('dropout: uniform 0 0.5\n\ndropout: choice 0.1 0.2\n', 'x.space')
  with pytest.raises(space_lib.SpaceError, match=r'^x.space: no searched flag'):
    space_lib.parse('# nothing\n\n', 'x.space')
  with pytest.raises(space_lib.SpaceError, match=r'nowhere.space: cannot read the space file'):
    space_lib.read(str(tmp_path / 'nowhere.space'))


@pytest.mark.parametrize('space, flagfiles', [
    ('space_seed.space', ('baseline.flags', 'batchnorm.flags')),
    ('space_96px.space', ('resnet50v2.flags', 'efficientnetv2b0.flags'))])
def test_the_shipped_spaces_check_with_the_shipped_recipes(space, flagfiles):
  params = space_lib.read(str(ROOT / 'configs' / space))
  names = {p.name for p in params}
  for flagfile in flagfiles:
    fixed = {}
    for line in (ROOT / 'configs' / flagfile).read_text().splitlines():
      match = re.fullmatch(r'--(\w+)=(.*)', line.strip())
      if match and match[1] in config_lib.Config.__dataclass_fields__ and match[1] not in (
          'records_dir', 'model_dir'):
        fixed[match[1]] = space_lib._parse_value(  # pylint: disable=protected-access
            match[2], space_lib.flag_types()[match[1]], flagfile, match[1])
    space_lib.check(params, {k: v for k, v in fixed.items() if k not in names})
  assert {'learning_rate', 'batch_size', 'dropout', 'weight_decay', 'label_smoothing',
          'lr_schedule', 'augment', 'stain_jitter'} <= names


def test_a_bad_space_line_ends_the_command_in_one_line_before_any_study_exists(
    small_records, tmp_path):
  space = tmp_path / 'bad.space'
  space.write_text('learning_rate: loguniform 1e-4 1e-2\nbatch_size: choice 32 0\n')
  study_dir = tmp_path / 'study'
  proc = subprocess.run([*TUNE, f'--records_dir={small_records}', f'--study_dir={study_dir}',
                         f'--space={space}', '--trials=2'], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f'tune: error: {space}:2: batch_size=0: pcam-train refuses it (--batch_size=0: must be '
      '>= 1)'], proc.stderr
  assert not study_dir.exists()


# --- The study (Optuna on SQLite; no training). ---

def _plan(tmp_path, records='', space='learning_rate: loguniform 1e-4 1e-2\n', trials=3,
          **kwargs):
  params = space_lib.parse(space, 'space')
  study_dir = str(tmp_path / 'study')
  os.makedirs(study_dir, exist_ok=True)
  fixed = kwargs.pop('fixed', {'epochs': 2})
  return api.worker_lib.Plan(records_dir=str(records), study_dir=study_dir,
                             storage=study_lib.default_storage(study_dir), study_name='pcam',
                             space=tuple(params), fixed=fixed, trials=trials, **kwargs)


def _identity(plan, fingerprint='abc'):
  records = type('R', (), {'manifest': {'fingerprint': fingerprint}})()
  return api.identity(plan, records)


def test_a_study_of_another_search_under_the_same_name_is_refused_naming_the_difference(tmp_path):
  plan = _plan(tmp_path)
  storage = study_lib.open_storage(plan.storage)
  study_lib.open_study(storage, 'pcam', _identity(plan), plan.storage)
  study_lib.open_study(storage, 'pcam', _identity(plan), plan.storage)  # The same: loaded.
  other = dataclasses.replace(plan, space=tuple(space_lib.parse(
      'learning_rate: loguniform 1e-5 1e-2\n', 's')), fixed={'epochs': 3})
  with pytest.raises(ValueError) as e:
    study_lib.open_study(storage, 'pcam', _identity(other), plan.storage)
  assert str(e.value) == (
      f"study 'pcam' in {plan.storage} searches something else (--learning_rate: "
      '"loguniform 0.0001 0.01" then, "loguniform 1e-05 0.01" now; --epochs: 2 then, 3 now); '
      'use another --study_name (or --storage)')
  with pytest.raises(ValueError, match=r'--records: .abc. then, .def. now'):
    study_lib.open_study(storage, 'pcam', _identity(plan, 'def'), plan.storage)
  searched = dataclasses.replace(plan, space=tuple(space_lib.parse(
      'learning_rate: loguniform 1e-4 1e-2\nepochs: int 2 4\n', 's')), fixed={})
  with pytest.raises(ValueError, match=r'--epochs: "fixed at 2" then, "int 2 4" now'):
    study_lib.open_study(storage, 'pcam', _identity(searched), plan.storage)


def _add(study, value, lr, state=None, epochs=(0.9, 0.95)):
  state = state or optuna.trial.TrialState.COMPLETE
  study.add_trial(optuna.create_trial(
      state=state, value=value if state == optuna.trial.TrialState.COMPLETE else None,
      params={'learning_rate': lr},
      distributions={'learning_rate': optuna.distributions.FloatDistribution(1e-4, 1e-2,
                                                                            log=True)},
      intermediate_values=dict(enumerate(epochs, 1)),
      user_attrs={'folder': f'trials/{len(study.trials)}', 'best_epoch': len(epochs)}))


def test_fewer_trials_than_the_study_holds_finished_is_refused(tmp_path):
  plan = _plan(tmp_path, trials=1)
  storage = study_lib.open_storage(plan.storage)
  study = study_lib.open_study(storage, 'pcam', _identity(plan), plan.storage)
  _add(study, 0.9, 1e-3)
  _add(study, 0.8, 2e-3, optuna.trial.TrialState.PRUNED)
  records = type('R', (), {'manifest': {'fingerprint': 'abc'}})()
  with pytest.raises(ValueError, match=r"^--trials=1: study 'pcam' already holds 2 finished "
                                       r'trials; ask for at least that many$'):
    api.run(plan, records, log=lambda _: None)


def test_a_storage_that_cannot_be_reached_is_one_line_without_its_password():
  with pytest.raises(ValueError) as e:
    study_lib.open_storage('postgresql+psycopg://tuner:s3cret@127.0.0.1:9/pcam')
  message = str(e.value)
  assert message.startswith('--storage=postgresql+psycopg://tuner:***@127.0.0.1:9/pcam: cannot '
                            'open the study database (') and 's3cret' not in message
  assert '\n' not in message
  with pytest.raises(ValueError, match=r'^--storage=nosuchdb://x: cannot open the study database'):
    study_lib.open_storage('nosuchdb://x')


def test_a_running_trial_whose_process_on_this_host_is_gone_is_taken_over_once(tmp_path):
  plan = _plan(tmp_path)
  storage = study_lib.open_storage(plan.storage)
  study = study_lib.open_study(storage, 'pcam', _identity(plan), plan.storage)
  gone = subprocess.Popen([sys.executable, '-c', 'pass'])
  gone.wait()
  trials = []
  for record in (dict(study_lib.owner(), pid=gone.pid),  # Dead, here.
                 study_lib.owner(),  # Alive (this process).
                 dict(study_lib.owner(), host='elsewhere', pid=gone.pid)):  # Another host's.
    trial = study.ask({'learning_rate': optuna.distributions.FloatDistribution(1e-4, 1e-2)})
    storage.set_trial_system_attr(trial._trial_id, study_lib.owner_key(trial._trial_id), record)  # pylint: disable=protected-access
    trials.append(trial)
  assert study_lib.take_over_dead_trials(study) == [(trials[0].number, True)]
  assert study_lib.take_over_dead_trials(study) == []  # Once only.
  states = [t.state for t in study.trials]
  assert states[:3] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING,
                        optuna.trial.TrialState.RUNNING]
  retry = study.trials[3]
  assert retry.state == optuna.trial.TrialState.WAITING
  assert retry.params == trials[0].params and study_lib.root_number(retry) == trials[0].number
  # The retry carries its failed trial's attributes, but is not owned by the dead process.
  assert not study_lib.owner_is_gone(retry.system_attrs.get(study_lib.owner_key(retry._trial_id)))  # pylint: disable=protected-access


def test_the_report_lists_trials_best_first_and_best_flags_is_exact(tmp_path):
  plan = _plan(tmp_path, records='/data/rec', fixed={'epochs': 2, 'model': 'batchnorm',
                                                     'batch_size': 64, 'augment': True,
                                                     'dropout': None})
  storage = study_lib.open_storage(plan.storage)
  study = study_lib.open_study(storage, 'pcam', _identity(plan), plan.storage)
  _add(study, 0.91, 1e-3)
  _add(study, None, 2e-3, optuna.trial.TrialState.PRUNED, epochs=(0.6, 0.7))
  _add(study, 0.9512345678901234, 0.0012345678901234567)
  _add(study, 0.93, 3e-3)
  results.write_tables(study, plan)
  table = results.table(plan.study_dir).splitlines()
  assert [line.split(' | ')[0].strip('| ') for line in table[2:]] == ['2', '3', '0', '1']
  assert table[2].startswith('| 2 | complete | 0.9512 | 2 | 2 | 0.0012345678901234567 |')
  assert table[5].startswith('| 1 | pruned | - |')
  flags = (tmp_path / 'study' / 'best.flags').read_text().splitlines()
  assert [f for f in flags if not f.startswith('#')] == [
      '--records_dir=/data/rec', f'--model_dir={plan.study_dir}/best', '--seed=0',
      '--epochs=2', '--model=batchnorm', '--augment', '--learning_rate=0.0012345678901234567']
  with pytest.raises(ValueError, match=r'trials.csv: no search here'):
    results.table(str(tmp_path / 'nothing'))


# --- Searches (training). ---

def _flags_to_options(path):
  """best.flags as pt.train's options (as pcam-train's parser would read them)."""
  types = {**space_lib.flag_types(), 'seed': int, 'records_dir': str, 'model_dir': str}
  options = {}
  for line in path.read_text().splitlines():
    if line.startswith('#') or not line.strip():
      continue
    match = re.fullmatch(r'--(no)?(\w+)(?:=(.*))?', line)
    if match[3] is None:
      options[match[2]] = not match[1]
    else:
      options[match[2]] = types[match[2]](match[3])
  return options


@pytest.mark.slow  # 7 runs: 50 s.
def test_a_seeded_search_runs_the_same_trials_twice_and_best_flags_reproduces_its_best(
    small_records, tmp_path):
  space = {'learning_rate': 'loguniform 3e-4 3e-3', 'batch_size': 'choice 16 32'}
  runs = []
  for name in ('a', 'b'):
    best = pt.tune(str(small_records), str(tmp_path / name), space=space, trials=3, epochs=2,
                   pruner='none', seed=4, strategy='default')
    trials = results.read_trials(str(tmp_path / name))
    for row in trials:  # All but the timings.
      del row['seconds'], row['run_seconds']
    runs.append((best, trials))
  (best_a, trials_a), (best_b, trials_b) = runs
  assert trials_a == trials_b and len(trials_a) == 3
  assert best_a['params'] == best_b['params'] and best_a['value'] == best_b['value']
  assert sorted(os.listdir(tmp_path / 'a' / 'trials')) == ['0', '1', '2']
  options = _flags_to_options(tmp_path / 'a' / 'best.flags')
  assert options['model_dir'] == str(tmp_path / 'a' / 'best') and options['seed'] == 4
  assert options.pop('strategy') == 'default'
  again = pt.train(options.pop('records_dir'), options.pop('model_dir'), progress=False,
                   strategy='default', **options)
  assert (again['val_auc'], again['val_loss']) == (best_a['metrics']['val_auc'],
                                                   best_a['metrics']['val_loss'])


@pytest.mark.slow  # 4 runs: 13 s (the README's test command keeps its 4 minutes).
def test_the_median_pruner_stops_a_bad_trial_after_its_second_epoch(small_records, tmp_path):
  study_dir = tmp_path / 'study'
  os.makedirs(study_dir)
  # Three good trials, then one that cannot learn (a rate of 1e-7): its val loss
  # stays at chance while theirs fall.
  study = optuna.create_study(storage=study_lib.default_storage(study_dir), study_name='pcam')
  for rate in (3e-3, 2e-3, 3e-3, 1e-7):
    study.enqueue_trial({'learning_rate': rate})
  # (One device: the test process may hold other tests' MirroredStrategy.)
  best = pt.tune(str(small_records), str(study_dir),
                 space={'learning_rate': 'loguniform 1e-7 1e-2'}, trials=4, epochs=4,
                 objective='val_loss', batch_size=32, strategy='default')
  rows = {r['number']: r for r in results.read_trials(str(study_dir))}
  assert [rows[n]['state'] for n in '0123'] == ['complete'] * 3 + ['pruned']
  assert rows['3']['epochs'] == '2' and [rows[n]['epochs'] for n in '012'] == ['4'] * 3
  metrics = json.loads((study_dir / 'trials' / '3' / 'metrics.json').read_text())
  assert metrics['pruned'] is True and metrics['epochs_run'] == 2
  assert best['number'] in (0, 1, 2)
  assert 'pruned' not in results.table(str(study_dir)).splitlines()[2]  # Best first.


# --- Several processes (the slow tier). ---

def _tune_cmd(records, study_dir, space, *extra):
  return [*TUNE, f'--records_dir={records}', f'--study_dir={study_dir}', f'--space={space}',
          '--epochs=3', '--batch_size=32', '--noprogress', '--steps_per_execution=4', *extra]


@pytest.fixture
def space_file(tmp_path):
  path = tmp_path / 'lr.space'
  path.write_text('learning_rate: loguniform 3e-4 3e-3\n')
  return path


@pytest.mark.slow
def test_two_workers_finish_six_trials_and_pcam_train_reproduces_the_best(
    small_records, tmp_path, space_file):
  study_dir = tmp_path / 'study'
  proc = subprocess.run(_tune_cmd(small_records, study_dir, space_file, '--trials=6',
                                  '--workers=2', '--pruner=none'),
                        capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  folders = os.listdir(study_dir / 'trials')
  assert len(folders) in (6, 7), folders
  assert {'worker 0: trial', 'worker 1: trial'} <= {m[0] for m in re.finditer(
      r'worker \d: trial', proc.stdout)}
  best = json.loads((study_dir / 'trials' / re.search(
      r'best: trial (\d+)', proc.stdout)[1] / 'metrics.json').read_text())
  again = subprocess.run([*TRAIN, f'--flagfile={study_dir / "best.flags"}', '--noprogress'],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  metrics = json.loads((study_dir / 'best' / 'metrics.json').read_text())
  assert (metrics['val_auc'], metrics['val_loss']) == (best['val_auc'], best['val_loss'])
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  trial_dir = study_dir / 'trials' / re.search(r'best: trial (\d+)', proc.stdout)[1]
  for a, b in zip(*(keras.saving.load_model(d / 'model.keras').get_weights()
                    for d in (trial_dir, study_dir / 'best'))):
    np.testing.assert_array_equal(a, b)  # The best epoch's weights, bit for bit.
  for name in results.PLOTS:
    assert (study_dir / f'{name}.png').stat().st_size > 1000
  report = subprocess.run([sys.executable, '-m', 'pcam_tfdata.report', str(study_dir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert report.returncode == 0 and report.stdout.count('| complete |') == len(folders)


def _wait_for(predicate, timeout, what):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.2)
  raise AssertionError(f'timed out waiting for {what}')


def _epochs_done(study_dir):
  counts = []
  for folder in (study_dir / 'trials').glob('*'):
    history = folder / 'history.csv'
    counts.append(len(history.read_text().splitlines()) - 1 if history.exists() else 0)
  return counts


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_that_trial_from_its_backup(
    small_records, tmp_path, space_file):
  study_dir = tmp_path / 'study'
  # No early stop: a trial with 2 or 3 of its 6 epochs is one still training,
  # with 3 more to go (the kill lands in it, however loaded the machine).
  cmd = _tune_cmd(small_records, study_dir, space_file, '--trials=3', '--workers=1',
                  '--pruner=none', '--epochs=6', '--early_stopping_patience=10')
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=ROOT, start_new_session=True)
  try:
    _wait_for(lambda: any(2 <= n <= 3 for n in _epochs_done(study_dir)), 600,
              'a trial with 2 epochs')
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
  killed = [n for n in _epochs_done(study_dir) if 0 < n < 6]
  assert killed, _epochs_done(study_dir)
  rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert re.search(r'resuming trial \d+ \(as trial \d+\) from its backup', rerun.stdout), (
      rerun.stdout)
  assert re.search(r'resuming (after epoch|epoch \d+ at step)', rerun.stdout), rerun.stdout
  rows = results.read_trials(str(study_dir))
  done = [r for r in rows if r['state'] == 'complete']
  assert len(done) == 3 and len({r['folder'] for r in done}) == 3
  # The retry reports every epoch of its run, those before the kill again.
  (retry,) = [r for r in done if r['retry_of']]
  history = (study_dir / retry['folder'] / 'history.csv').read_text().splitlines()[1:]
  assert int(retry['epochs']) == len(history) >= 2, retry
  for row in history:
    epoch, auc = row.split(',')[0], row.split(',')[5]
    assert float(retry[f'val_auc_epoch_{epoch}']) == float(auc), (retry, row)
  assert sorted(os.listdir(study_dir / 'trials')) == sorted(r['folder'][7:] for r in done)


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_within_seconds_and_a_rerun_continues(
    small_records, tmp_path, space_file):
  study_dir = tmp_path / 'study'
  cmd = _tune_cmd(small_records, study_dir, space_file, '--trials=3', '--workers=2',
                  '--pruner=none', '--epochs=8', '--early_stopping_patience=10')
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT, start_new_session=True)
  _wait_for(lambda: sum(1 <= n <= 4 for n in _epochs_done(study_dir)) >= 2, 600,
            'both workers training (4 epochs or more to go)')
  os.killpg(proc.pid, signal.SIGINT)  # As a terminal's Ctrl-C: the whole foreground group.
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert err.strip().splitlines()[-1].startswith('tune: error: interrupted; rerun the same '
                                                 'command'), err

  def group_gone():  # No process of the search left (its helpers end as their pipes close).
    try:
      os.killpg(proc.pid, 0)
      return False
    except ProcessLookupError:
      return True
  _wait_for(group_gone, 30, 'the last process of the search to end')
  assert out.count('interrupted; a rerun resumes it') == 2, out
  rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert rerun.stdout.count('from its backup in') == 2, rerun.stdout
  assert sum(r['state'] == 'complete' for r in results.read_trials(str(study_dir))) in (3, 4)


_PG_BIN = '/usr/lib/postgresql/15/bin'


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture
def postgres():
  """A PostgreSQL 15 server on 127.0.0.1 (a free port), with a database `pcam`; stopped after."""
  if not os.path.exists(os.path.join(_PG_BIN, 'initdb')):
    pytest.skip(f'PostgreSQL is not installed here ({_PG_BIN}/initdb)')
  as_postgres = ['runuser', '-u', 'postgres', '--'] if os.geteuid() == 0 else []
  if as_postgres:  # initdb refuses root: run it as the `postgres` user.
    import pwd  # pylint: disable=g-import-not-at-top
    try:
      pwd.getpwnam('postgres')
    except KeyError:
      pytest.skip('running as root and there is no `postgres` user to run initdb as')
    if not shutil.which('runuser'):
      pytest.skip('running as root without runuser: initdb refuses root')
  # Not under pytest's own temporary folder, which only its owner may enter.
  base = pathlib.Path(tempfile.mkdtemp(prefix='pcam-pg-'))
  os.chmod(base, 0o777)
  data = base / 'data'
  port = _free_port()
  run = lambda *args: subprocess.run([*as_postgres, *args], capture_output=True, text=True,
                                     timeout=120, check=True)
  run(f'{_PG_BIN}/initdb', '-D', str(data), '-A', 'trust', '-U', 'postgres')
  run(f'{_PG_BIN}/pg_ctl', '-D', str(data), '-l', str(base / 'log'), '-w', '-o',
      f'-p {port} -k {base} -c listen_addresses=127.0.0.1', 'start')
  try:
    run(f'{_PG_BIN}/createdb', '-h', '127.0.0.1', '-p', str(port), '-U', 'postgres', 'pcam')
    yield f'postgresql+psycopg://postgres@127.0.0.1:{port}/pcam'
  finally:
    run(f'{_PG_BIN}/pg_ctl', '-D', str(data), '-m', 'fast', '-w', 'stop')
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_hosts_share_one_postgresql_study_and_never_run_a_trial_twice(
    small_records, tmp_path, space_file, postgres):
  procs = [subprocess.Popen(_tune_cmd(small_records, tmp_path / f'host{k}', space_file,
                                      '--trials=4', '--workers=1', '--pruner=none',
                                      f'--storage={postgres}', '--study_name=shared'),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
           for k in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for proc, (out, err) in zip(procs, outs):
    assert proc.returncode == 0, err[-3000:]
  ran = [re.findall(r'^trial (\d+) finished', out, re.M) for out, _ in outs]
  assert ran[0] and ran[1], outs  # Both hosts worked.
  assert not set(ran[0]) & set(ran[1]), ran  # No trial twice.
  study = optuna.load_study(study_name='shared', storage=postgres)
  finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
  assert len(finished) in (4, 5) and sorted(int(n) for n in ran[0] + ran[1]) == sorted(
      t.number for t in finished)


def test_a_trial_that_crashes_is_one_line_and_the_search_goes_on(small_records, tmp_path,
                                                                 monkeypatch, capsys):
  from pcam_tfdata.training import api as train_api  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_train(records_dir, model_dir, *, on_epoch_end, **options):
    calls.append(options['learning_rate'])
    if len(calls) in failing:
      raise RuntimeError('OOM when allocating tensor\nwith shape [64,96,96,3]')
    os.makedirs(model_dir, exist_ok=True)
    assert not on_epoch_end(1, {'val_auc': 0.5 + len(calls) / 100, 'val_loss': 0.6})
    metrics = {'val_auc': 0.5 + len(calls) / 100, 'val_loss': 0.6, 'best_epoch': 1,
               'epochs_run': 1}
    with open(os.path.join(model_dir, 'metrics.json'), 'w') as f:
      json.dump(metrics, f)
    return metrics

  monkeypatch.setattr(train_api, 'train', fake_train)
  failing = {1}
  best = pt.tune(str(small_records), str(tmp_path / 'a'), space={'dropout': 'uniform 0 0.5'},
                 trials=2, epochs=1)
  out = capsys.readouterr().out
  assert 'trial 0 failed: RuntimeError: OOM when allocating tensor\n' in out, out
  states = [r['state'] for r in results.read_trials(str(tmp_path / 'a'))]
  assert states == ['fail', 'complete', 'complete'] and best['number'] == 2
  failing = {1, 2, 3}
  calls.clear()
  with pytest.raises(ValueError, match=r'^3 trials in a row failed'):
    pt.tune(str(small_records), str(tmp_path / 'b'), space={'dropout': 'uniform 0 0.5'},
            trials=2, epochs=1)


def test_a_searched_epochs_sizes_the_table_and_the_pruner():
  plan = api.worker_lib.Plan(records_dir='', study_dir='', storage='', study_name='',
                             space=tuple(space_lib.parse('epochs: int 5 20\n', 's')),
                             fixed={'epochs': 10}, trials=1)
  assert plan.max_epochs() == 20
  assert study_lib.make_pruner('hyperband', plan.max_epochs())._max_resource == 20  # pylint: disable=protected-access


@pytest.mark.slow  # A fresh process with two logical CPUs: 20 s.
def test_runs_one_after_another_in_one_process_share_their_mirrored_strategy(small_records,
                                                                            tmp_path):
  """A search's trials (and a notebook's runs) train one after another in one process.

  A second MirroredStrategy numbered its collective ops as the first did:
  the second run, of another model, failed ("Shape mismatch in the
  collective instance").
  """
  script = (
      'import sys, pcam_tfdata as pt\n'
      'from pcam_tfdata.training import distribute\n'
      'distribute.split_cpu(2)\n'
      'for k, model in enumerate(["batchnorm", "baseline", "baseline"]):\n'
      '  m = pt.train(sys.argv[1], f"{sys.argv[2]}/{k}", model=model, epochs=1, seed=0,\n'
      '               strategy="mirrored", batch_size=32, progress=False)\n'
      '  print("AUC", m["num_replicas_in_sync"], m["val_auc"])\n')
  proc = subprocess.run([sys.executable, '-c', script, str(small_records), str(tmp_path)],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  aucs = re.findall(r'^AUC 2 (\S+)$', proc.stdout, re.M)
  assert len(aucs) == 3 and aucs[1] == aucs[2], proc.stdout  # Seeded: the same run twice.
