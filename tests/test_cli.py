"""What every entry point shares: quiet start-up on any CPU, one error line, progress."""

import importlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import types
import zipfile

import pytest

from pcam_tfdata import cli
from pcam_tfdata import progress
from conftest import ROOT, error_lines, run_in_terminal, run_tool, user_env

# Start-up lines as TensorFlow 2.21 prints them (oneDNN on an x86 host), the
# older TF form, and what must survive the filter.
_ONEDNN = ('I0000 00:00:1795800536.636590    1938 port.cc:153] oneDNN custom operations are on. '
           'You may see slightly different numerical results due to floating-point round-off '
           'errors from different computation orders.\n')
_PREAMBLE = ('WARNING: All log messages before absl::InitializeLog() is called are written to '
             'STDERR\n')
_CPU_GUARD = ('I0000 00:00:1795800536.731613    1938 cpu_feature_guard.cc:227] This TensorFlow '
              'binary is optimized to use available CPU instructions in performance-critical '
              'operations.\n',
              'To enable the following instructions: AVX2 FMA, in other operations, rebuild '
              'TensorFlow with the appropriate compiler flags.\n')
_OLD_WARNING = ('2025-09-17 14:44:05.228000: W external/local_xla/xla/stream_executor/cuda/'
                'cuda_executor.cc:1000] could not open file to read NUMA node\n')
_ERROR = ('E0000 00:00:1758131045.203198 3722035 cuda_dnn.cc:8579] Unable to register cuDNN '
          'factory\n')
_PY_WARNING = ('/venv/lib/python3.11/site-packages/foo.py:12: DeprecationWarning: bar is '
               'deprecated\n', '  import bar\n')


def test_filter_drops_records_below_the_level_and_keeps_the_rest():
  lines = [_PREAMBLE, _ONEDNN, *_CPU_GUARD, _OLD_WARNING, _ERROR, *_PY_WARNING, 'plain text\n']
  assert cli.filter_log_lines(lines, 0) == lines
  assert cli.filter_log_lines(lines, 1) == [_OLD_WARNING, _ERROR, *_PY_WARNING, 'plain text\n']
  assert cli.filter_log_lines(lines, 2) == [_ERROR, *_PY_WARNING, 'plain text\n']
  assert cli.filter_log_lines(lines, 3) == [*_PY_WARNING, 'plain text\n']


# Error records of runs that succeed (issue 30), as TensorFlow 2.21 logs them.
_HALF = ('E0000 00:00:1796433235.186603   22748 util.cc:131] oneDNN supports DT_HALF only on '
         'platforms with AVX-512. Falling back to the default Eigen-based implementation if '
         'present.\n')
_START_ABORT = ('E0000 00:00:1796433235.186603   22748 coordination_service_agent.cc:563] '
                'Coordination agent is set to error: UNAVAILABLE: ... StartAbort ... The tasks '
                'have crashed.\n')


def test_the_error_records_of_runs_that_succeed_go_with_the_warnings():
  lines = [_HALF, _START_ABORT, _ERROR]
  assert cli.filter_log_lines(lines, 2) == [_ERROR]  # Any other error record stays,
  assert cli.filter_log_lines(lines, 1) == lines  # and a user's level below 2 keeps all.


def test_a_run_keeps_the_filter_on_its_cpp_records_and_python_writes_straight(tmp_path):
  """After the import, a C++ record on fd 2 is filtered; Python's stderr is not."""
  code = ('import os, sys\n'
          'from pcam_tfdata import cli\n'
          'cli.import_tensorflow()\n'
          f'os.write(2, {(_HALF + _ERROR).encode()!r})\n'
          'print("python line", file=sys.stderr)\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                        env=user_env(), timeout=300)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stderr.splitlines(keepends=True)
  assert _ERROR in lines and 'python line\n' in lines and _HALF not in lines, lines


@pytest.mark.parametrize('line', [
    '<frozen importlib._bootstrap>:241: RuntimeWarning: numpy.ndarray size changed\n',
    '/Users/me/My Drive/venv/foo.py:12: UserWarning: a path with a space\n',
    'Exception ignored in: <function _removeHandlerRef at 0x7f>\n',
    'WARNING:tensorflow:From /x.py:3: a deprecation\n',
    # Python's absl logging looks like a C++ record, but comes from a .py file.
    'W1127 20:33:01.123456 140234 tf_logging.py:12] a Python-side TF warning\n',
    'any other line\n'])
def test_only_cpp_records_are_dropped_never_what_follows_them(line):
  lines = [*_CPU_GUARD, line]  # Right after a dropped two-line record.
  assert cli.filter_log_lines(lines, 2) == [line]
  assert cli.filter_log_lines([_ONEDNN, line], 3) == [line]


_FAKE_TENSORFLOW = '''
import os
os.write(2, b"I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on.\\n")
os.write(2, b"F0000 00:00:1.0 1 cpu_feature_guard.cc:1] This TensorFlow binary was compiled "
            b"to use AVX instructions, but these aren't available on your machine.\\n")
os.abort()
'''


def test_an_import_that_aborts_still_shows_why(tmp_path):
  """What TensorFlow prints on a CPU it cannot run on must reach the user."""
  (tmp_path / 'tensorflow').mkdir()
  (tmp_path / 'tensorflow' / '__init__.py').write_text(_FAKE_TENSORFLOW)
  proc = subprocess.run([sys.executable, '-c', 'from pcam_tfdata import cli; '
                         'cli.import_tensorflow()'], capture_output=True, text=True, cwd=ROOT,
                        env=user_env(PYTHONPATH=str(tmp_path)), timeout=120)
  assert proc.returncode != 0
  assert "aren't available on your machine" in proc.stderr and 'oneDNN' not in proc.stderr


def test_a_closed_stderr_does_not_stop_the_import():
  proc = subprocess.run([sys.executable, '-c', 'import os, sys; os.close(2); sys.stderr = None; '
                         'from pcam_tfdata import cli; tf = cli.import_tensorflow(); '
                         'print(int(tf.constant(41) + 1))'], capture_output=True, text=True,
                        cwd=ROOT, env=user_env(), timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == '42'


@pytest.mark.parametrize('env_level, verbose, expected', [
    (None, False, 2), ('1', False, 1), ('0', False, 0), ('3', False, 3), (None, True, 0),
    ('3', True, 0), ('junk', False, 2)])
def test_log_level_the_user_sets_wins_over_the_default(monkeypatch, env_level, verbose,
                                                       expected):
  if env_level is None:
    monkeypatch.delenv('TF_CPP_MIN_LOG_LEVEL', raising=False)
  else:
    monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', env_level)
  assert cli.tf_log_level(verbose) == expected


_IMPORT = '''
import sys
from pcam_tfdata import cli
cli.import_tensorflow(verbose=sys.argv[1] == 'verbose')
import os
print(os.environ['TF_CPP_MIN_LOG_LEVEL'])
'''
_RECORD_HEADER = re.compile(r'^[IWEF]\d{4} [\d:.]+\s+\d+ ')


def _startup(mode, **env):
  proc = subprocess.run([sys.executable, '-c', _IMPORT, mode], capture_output=True, text=True,
                        cwd=ROOT, env=user_env(**env), timeout=300)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip(), proc.stderr.splitlines(keepends=True)


def _records(lines):
  # Timestamps and thread ids differ between runs; the records must not.
  return [_RECORD_HEADER.sub('', l) for l in lines]


@pytest.mark.slow  # (15 s; to keep the default tier within 4 minutes from a fresh clone)
def test_quiet_by_default_and_verbose_shows_what_tensorflow_prints():
  level, quiet = _startup('quiet')
  assert level == '2'
  # No info or warning record (errors, as a CUDA build may print, would stay).
  assert quiet == cli.filter_log_lines(quiet, 2) and not any(
      cli._ABSL_PREAMBLE in l for l in quiet), quiet
  level, verbose = _startup('verbose')
  plain = subprocess.run([sys.executable, '-c', 'import tensorflow'], capture_output=True,
                         text=True, env=user_env(), timeout=300)
  assert level == '0'
  assert _records(verbose) == _records(plain.stderr.splitlines(keepends=True))


def test_the_users_own_log_level_stands(monkeypatch):
  """import_tensorflow sets the level it filters by, and the user's wins over the default."""
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '1')
  cli.import_tensorflow()  # (Already imported here: only the level is set.)
  assert os.environ['TF_CPP_MIN_LOG_LEVEL'] == '1'
  monkeypatch.delenv('TF_CPP_MIN_LOG_LEVEL')
  cli.import_tensorflow()
  assert os.environ['TF_CPP_MIN_LOG_LEVEL'] == cli.DEFAULT_TF_LOG_LEVEL


@pytest.mark.parametrize('args, path', [
    (['-m', 'pcam_tfdata.train', '--records_dir=/nonexistent/records', '--model_dir=MODEL'],
     '/nonexistent/records'),
    (['-m', 'pcam_tfdata.predict', '--model_dir=/nonexistent/run', '--records_dir=RECORDS'],
     '/nonexistent/run/model.keras'),
    (['tools/make_records.py', '--data_dir=/nonexistent/pcam', '--out_dir=OUT'],
     '/nonexistent/pcam'),
    (['tools/verify_records.py', '/nonexistent/records'], '/nonexistent/records'),
    (['-m', 'pcam_tfdata.report', '/nonexistent/run'], '/nonexistent/run/metrics.json'),
])
def test_a_bad_path_is_one_error_line_naming_it(records, tmp_path, args, path):
  args = [a.replace('MODEL', str(tmp_path / 'run')).replace('RECORDS', str(records))
          .replace('OUT', str(tmp_path / 'out')) for a in args]
  proc = run_tool(*args)
  assert proc.returncode != 0
  errors = error_lines(proc.stderr)
  assert len(errors) == 1 and path in errors[0], proc.stderr
  # Nothing else from TensorFlow's start-up on the terminal.
  lines = proc.stderr.splitlines(keepends=True)
  assert cli.filter_log_lines(lines, 2) == lines, proc.stderr


def test_an_error_found_after_tensorflow_started_is_still_one_line(records, tmp_path):
  """The replica check needs TensorFlow's devices: start-up chatter came before it."""
  proc = run_tool('-m', 'pcam_tfdata.train', f'--records_dir={records}',
                  f'--model_dir={tmp_path / "run"}', '--strategy=mirrored',
                  '--num_cpu_devices=2', '--batch_size=7', env=user_env(CUDA_VISIBLE_DEVICES=''))
  assert proc.returncode == 1
  assert error_lines(proc.stderr) == [
      'train: error: --batch_size=7 is not divisible by the 2 replicas in sync'], proc.stderr
  lines = proc.stderr.splitlines(keepends=True)
  assert cli.filter_log_lines(lines, 2) == lines, proc.stderr  # No start-up chatter.


class _FakeClock:

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_progress_in_a_log_is_a_line_every_interval():
  clock, out = _FakeClock(), io.StringIO()
  with progress.Progress(10, 'epoch 2/5', images_per_step=64, stream=out, interval=30,
                         clock=clock) as bar:
    for step in range(1, 11):
      clock.now += 10  # Ten seconds a step: a line every third step.
      bar.update(step, loss=0.25, accuracy=0.5)
  lines = out.getvalue().splitlines()
  assert lines == [f'epoch 2/5: {n}/10 steps loss=0.2500 accuracy=0.5000 images/s=6'
                   for n in (3, 6, 9)]  # Not at 10: the epoch's own line follows.


def test_progress_on_a_terminal_is_a_bar_with_every_step_and_the_metrics():
  out = io.StringIO()
  with progress.Progress(4, 'epoch 1/1', images_per_step=8, stream=out, live=True) as bar:
    for step in range(1, 5):
      bar.update(step, loss=0.5)
  text = out.getvalue()
  assert '0/4' in text and '4/4' in text and 'loss=0.5000' in text and 'images/s=' in text


class _Kernel:
  """What IPython.get_ipython() returns inside a Jupyter kernel, as far as tqdm looks."""
  config = {'IPKernelApp': {}}


def test_progress_in_a_notebook_is_tqdms_auto_bar_not_lines(monkeypatch):
  """A kernel's stderr is no terminal, yet the bar must render (tqdm.auto's front end)."""
  import tqdm.auto  # pylint: disable=g-import-not-at-top
  out = io.StringIO()
  with progress.Progress(4, 'x', images_per_step=8, stream=out, interval=0) as bar:
    bar.update(2)
    assert bar._bar is None  # pylint: disable=protected-access  # A log: lines.
  assert out.getvalue() == 'x: 2/4 steps images/s=' + out.getvalue().split('=')[1]
  monkeypatch.setitem(sys.modules, 'IPython', types.SimpleNamespace(get_ipython=_Kernel))
  assert progress.in_notebook()
  out = io.StringIO()
  with progress.Progress(4, 'x', images_per_step=8, stream=out, interval=0) as bar:
    assert type(bar._bar) is tqdm.auto.tqdm  # pylint: disable=protected-access
    bar.update(2)
  assert 'x: 2/4 steps' not in out.getvalue()  # No log line.
  # A plain IPython shell (no kernel), or none at all: not a notebook.
  monkeypatch.setitem(sys.modules, 'IPython',
                      types.SimpleNamespace(get_ipython=lambda: types.SimpleNamespace(config={})))
  assert not progress.in_notebook()
  monkeypatch.setitem(sys.modules, 'IPython', types.SimpleNamespace(get_ipython=lambda: None))
  assert not progress.in_notebook()


def test_conversion_progress_in_a_log_is_not_a_bar(monkeypatch):
  """The converter reports through the same display: in a log, no carriage-return bar,
  and no line before 30 s have passed (the clock here never moves)."""
  from pcam_tfdata.convert import pool  # pylint: disable=g-import-not-at-top
  lines = io.StringIO()
  monkeypatch.setattr(sys, 'stderr', lines)  # Not a terminal.
  monkeypatch.setitem(progress.Progress.__init__.__kwdefaults__, 'clock', lambda: 0.0)

  def task(n, counter):
    with counter.get_lock():
      counter.value += n
    return n

  assert list(pool.run_tasks(task, [10] * 6, 1, 60, 0, True)) == [10] * 6
  assert lines.getvalue() == ''


def test_disabled_progress_writes_nothing():
  out = io.StringIO()
  with progress.Progress(4, 'x', images_per_step=8, stream=out, live=True,
                         enabled=False) as bar:
    bar.update(4, loss=0.5)
  assert out.getvalue() == ''


def _epoch_steps(text, epochs):
  """{epoch: the set of n/N counts its bar showed} from terminal output."""
  shown = {e: set() for e in range(1, epochs + 1)}
  for epoch, done, total in re.findall(r'epoch (\d+)/\d+: +\d+%\|[^|]*\| *(\d+)/(\d+)', text):
    shown[int(epoch)].add((int(done), int(total)))
  return shown


@pytest.mark.slow  # (8 s; to keep the default tier within 4 minutes from a fresh clone)
def test_training_in_a_terminal_shows_steps_of_each_epoch(records, tmp_path):
  """Also MultiWorkerMirroredStrategy with no cluster described: one local worker."""
  env = {k: v for k, v in user_env().items() if k not in ('TF_CONFIG', 'SLURM_JOB_ID')}
  status, text = run_in_terminal('-m', 'pcam_tfdata.train', f'--records_dir={records}',
                                 f'--model_dir={tmp_path / "run"}', '--epochs=2',
                                 '--batch_size=8', '--mixed_precision=off',
                                 '--strategy=multi_worker', env=env)
  assert status == 0, text[-3000:]
  steps = 48 // 8  # The records fixture holds 48 train examples.
  for epoch, counts in _epoch_steps(text, 2).items():
    assert {(0, steps), (steps, steps)} <= counts, (epoch, counts, text[-3000:])
    assert {total for _, total in counts} == {steps}
  assert 'loss=' in text and 'accuracy=' in text and 'images/s=' in text
  assert re.search(r'evaluating train: .*\|', text)  # The final exact evaluation too.
  # Nothing from the interpreter's exit (a preemption handler's thread once
  # ran its __del__ there: "Exception ignored ... cannot join current thread").
  assert 'Traceback' not in text and 'Exception ignored' not in text, text[-3000:]
  metrics = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
  assert metrics['strategy'] == 'multi_worker' and metrics['num_replicas_in_sync'] == 1


def test_noprogress_shows_no_steps_only_each_epochs_line(records, tmp_path, capfd):
  train = importlib.import_module('pcam_tfdata.train')  # The command's module.
  train.run(train.Config(records_dir=str(records), model_dir=str(tmp_path / 'quiet'), epochs=1,
                         batch_size=8, eval_batch_size=16, mixed_precision='off',
                         strategy='default', progress=False))
  out, err = capfd.readouterr()
  assert _epoch_steps(out + err, 1) == {1: set()} and 'epoch=1 ' in out
  assert 'evaluating' not in err and 'steps' not in err


# Each console script, its other form (README), and a line its --help must show.
_CONSOLE_SCRIPTS = {
    'pcam-make-records': (['tools/make_records.py'], '--per_class'),
    'pcam-verify-records': (['tools/verify_records.py'], '--[no]verbose'),
    'pcam-train': (['-m', 'pcam_tfdata.train'], '--records_dir'),
    'pcam-predict': (['-m', 'pcam_tfdata.predict'], '--[no]tta'),
    'pcam-report': (['-m', 'pcam_tfdata.report'], 'pcam_tfdata.report runs/demo/baseline'),
    'pcam-data-service': (['-m', 'pcam_tfdata.data_service'], '--dispatcher_address'),
    'pcam-launch-local-cluster': (['tools/launch_local_cluster.py'], '--num_workers'),
}


def _flag_lines(text):
  return re.findall(r'^  (--\S+):', text, re.M)


@pytest.mark.parametrize('script', sorted(_CONSOLE_SCRIPTS))
def test_each_console_script_is_its_command_and_its_help_lists_its_flags(script):
  other_form, shown = _CONSOLE_SCRIPTS[script]
  path = os.path.join(os.path.dirname(sys.executable), script)
  assert os.path.isfile(path), f'{path}: missing (pip install -e . puts it there)'
  proc = subprocess.run([path, '--help'], capture_output=True, text=True, env=user_env(),
                        timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert shown in proc.stdout, proc.stdout
  same = run_tool(*other_form, '--help')
  assert same.returncode == 0, same.stderr[-2000:]
  assert _flag_lines(proc.stdout) == _flag_lines(same.stdout)
  assert (len(_flag_lines(proc.stdout)) > 0) == (script != 'pcam-report')
  # Its errors name it as it was called; the other form's by its own name.
  bad = subprocess.run([path, '--no_such_flag'], capture_output=True, text=True,
                       env=user_env(), timeout=120, cwd=ROOT)
  assert bad.returncode == 1 and bad.stderr.splitlines() == [
      f'{script}: error: Unknown command line flag \'no_such_flag\'; see --help'], bad.stderr
  other = run_tool(*other_form, '--no_such_flag')
  name = os.path.basename(other_form[-1]).removeprefix('pcam_tfdata.')
  assert other.stderr.startswith(f'{name}: error: '), other.stderr


def test_an_error_after_ctrl_c_is_the_interrupt_one_line_status_130(capsys):
  """A SIGINT inside a TensorFlow op surfaces as that op's (or a peer's) error, not as
  KeyboardInterrupt; once the user has interrupted, it is the interruption.

  Python's own SIGINT handler to start from, whatever an earlier test in this process
  left; and only this program's lines of stderr (a TensorFlow thread of an earlier
  in-process run may log there meanwhile: one failure in a full run, not reproduced).
  """
  before = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(SystemExit) as stopped:
      with cli.stops_on_interrupt('train', 'interrupted; rerun to resume'):
        try:
          signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
          raise RuntimeError('Socket closed (a peer stopped first)') from None
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert [l for l in err.splitlines() if l.startswith('train')] == [
        'train: error: interrupted; rerun to resume'], err
    # Without an interrupt, an error stays itself (with its traceback).
    with pytest.raises(RuntimeError, match='Socket closed'):
      with cli.stops_on_interrupt('train', 'interrupted'):
        raise RuntimeError('Socket closed')
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Restored.
  finally:
    signal.signal(signal.SIGINT, before)



def test_a_failure_keeps_its_status_whatever_help_flag_is_named():
  proc = run_tool('-m', 'pcam_tfdata.train', '--help=false', '--records_dir=/nonexistent/rec',
                  '--model_dir=/nonexistent/run')
  assert proc.returncode == 1 and error_lines(proc.stderr) == [
      'train: error: /nonexistent/rec: no such records folder'], proc.stderr


def test_a_config_flagfile_is_read_from_the_installed_package_where_the_folder_has_none(
    tmp_path):
  """`pip install` without -e: the wheel holds configs/ as pcam_tfdata/configs."""
  wheels = tmp_path / 'wheels'
  built = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps',
                          '--no-build-isolation', '-w', str(wheels), str(ROOT)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert built.returncode == 0, built.stderr[-2000:]
  (wheel,) = wheels.glob('pcam_tfdata-*.whl')
  shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith('pcam_tfdata/configs/')}
  assert shipped == {f'pcam_tfdata/configs/{p.name}' for p in (ROOT / 'configs').glob('*.*')
                     if p.suffix in ('.flags', '.space')}
  assert any(n.startswith('pcam_tfdata/tuning/') for n in zipfile.ZipFile(wheel).namelist())
  zipfile.ZipFile(wheel).extractall(tmp_path / 'site')  # As pip lays a wheel out.
  env = user_env(PYTHONPATH=str(tmp_path / 'site'))
  elsewhere = tmp_path / 'elsewhere'  # No configs/ here.
  elsewhere.mkdir()
  proc = run_tool('-m', 'pcam_tfdata.train', '--flagfile=configs/demo.flags',
                  '--records_dir=/nonexistent/rec', '--model_dir=run', cwd=elsewhere, env=env)
  assert proc.returncode == 1 and error_lines(proc.stderr) == [
      'train: error: /nonexistent/rec: no such records folder'], proc.stderr  # (Read: no
  # "cannot read flagfile"; and its --epochs etc. parsed.)
  where = subprocess.run([sys.executable, '-c', 'from pcam_tfdata import cli; '
                          'print(cli.packaged_config("configs/demo.flags"))'],
                         capture_output=True, text=True, cwd=elsewhere, env=env, timeout=60)
  assert where.stdout.strip() == str(tmp_path / 'site' / 'pcam_tfdata' / 'configs' / 'demo.flags')
  missing = run_tool('-m', 'pcam_tfdata.train', '--flagfile=configs/nosuch.flags', cwd=elsewhere,
                     env=env)
  assert missing.returncode == 1 and 'configs/nosuch.flags' in missing.stderr
  # pcam-tune's space files the same way: read (the records are what is missing).
  tune = run_tool('-m', 'pcam_tfdata.tune', '--space=configs/space_seed.space',
                  '--records_dir=/nonexistent/rec', '--study_dir=study', cwd=elsewhere, env=env)
  assert tune.returncode == 1 and error_lines(tune.stderr) == [
      'tune: error: /nonexistent/rec: no such records folder'], tune.stderr
