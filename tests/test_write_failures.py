"""One line, status 1, for every output that cannot be written and every malformed flag."""

import errno
import os
import subprocess
import uuid

import pytest

from pcam_tfdata import cli
from conftest import run_tool


@pytest.fixture
def read_only(tmp_path):
  """A read-only file system (a tmpfs mounted so), or a skip where this test cannot mount one."""
  mount = tmp_path / 'ro'
  mount.mkdir()
  made = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k,ro', 'tmpfs', str(mount)],
                        capture_output=True)
  if made.returncode:
    pytest.skip('cannot mount a tmpfs here (needs root); write_failure is unit-tested below')
  yield mount
  subprocess.run(['umount', str(mount)], check=True)


@pytest.fixture
def a_file(tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('not a folder\n')
  return path


def _commands(kaggle_dir, records, model_dir, out):
  """Each command that writes, with `out` as its output."""
  return {
      'make_records': (['tools/make_records.py', f'--data_dir={kaggle_dir}', '--per_class=0',
                        f'--out_dir={out}'], 'make_records.py', f'--out_dir={out}'),
      'train': (['-m', 'pcam_tfdata.train', f'--records_dir={records}', f'--model_dir={out}'],
                'train', f'--model_dir={out}'),
      'predict': (['-m', 'pcam_tfdata.predict', f'--model_dir={model_dir}',
                   f'--records_dir={records}', f'--output={out}'], 'predict', f'--output={out}'),
      'make_synthetic': (['tools/make_synthetic.py', f'--out_dir={out}', '--num_train=10'],
                         'make_synthetic.py', f'--out_dir={out}'),
  }


@pytest.fixture(scope='module')
def finished_run(records, tmp_path_factory):
  """A model.keras for predict to read (written, not trained: only its presence is checked first)."""
  run = tmp_path_factory.mktemp('run')
  (run / 'model.keras').write_bytes(b'')
  return run


@pytest.mark.parametrize('command', ['make_records', 'train', 'predict', 'make_synthetic'])
@pytest.mark.parametrize('where', ['read_only', 'under_a_file'])
def test_an_output_that_cannot_be_written_is_one_line(kaggle_dir, records, finished_run, command,
                                                      where, request):
  base = (request.getfixturevalue('read_only') if where == 'read_only'
          else request.getfixturevalue('a_file'))
  out = base / ('out.csv' if command == 'predict' else 'out')
  args, program, named = _commands(kaggle_dir, records, finished_run, out)[command]
  proc = run_tool(*args)
  assert proc.returncode == 1, proc.stderr
  reason = ('read-only file system' if where == 'read_only' else
            f'its folder {base} is a file' if command == 'predict' else
            'a part of the path is a file, not a folder')
  assert proc.stderr.splitlines()[-1].startswith(
      f'{program}: error: cannot write {named}: {reason}'), proc.stderr
  assert 'Traceback' not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
  if where == 'read_only' and command in ('train', 'predict'):  # Tried before TensorFlow:
    named_path = '' if command == 'train' else f' ({base})'  # the folder, not a probe file.
    assert proc.stderr == f'{program}: error: cannot write {named}: {reason}{named_path}\n'


def test_predict_into_a_missing_folder_is_one_line(records, finished_run, tmp_path):
  out = tmp_path / 'no' / 'such' / 'submission.csv'
  proc = run_tool('-m', 'pcam_tfdata.predict', f'--model_dir={finished_run}',
                  f'--records_dir={records}', f'--output={out}')
  assert proc.returncode == 1
  assert proc.stderr.splitlines() == [f'predict: error: cannot write --output={out}: its folder '
                                      f'{out.parent} does not exist'], proc.stderr


@pytest.mark.parametrize('error, line', [
    (OSError(errno.ENOSPC, 'No space left on device'),  # (From a worker process: no path.)
     'cannot write --out_dir=/mnt/o: no space left on the device'),
    (OSError(errno.EROFS, 'Read-only file system', '/mnt/.o.partial-1f2e'),
     'cannot write --out_dir=/mnt/o: read-only file system (/mnt/.o.partial-1f2e)'),
    (OSError(errno.EDQUOT, 'Disk quota exceeded', '/mnt/o'),
     'cannot write --out_dir=/mnt/o: disk quota exceeded'),  # (The path is the output itself.)
    (FileExistsError(errno.EEXIST, 'File exists', '/mnt'),  # A file where a folder goes.
     'cannot write --out_dir=/mnt/o: a part of the path is a file, not a folder (/mnt)'),
    (PermissionError(errno.EACCES, 'Permission denied', '/mnt/o/shard-1'),
     'cannot write --out_dir=/mnt/o: permission denied (/mnt/o/shard-1)'),
    # Errors on other paths are reads: an input the user must fix, not the output.
    (PermissionError(errno.EACCES, 'Permission denied', '/mnt/data/train_labels.csv'),
     'cannot read /mnt/data/train_labels.csv: permission denied'),
    # A sibling whose name starts as the output's is not in it, nor its partial.
    (PermissionError(errno.EACCES, 'Permission denied', '/mnt/ob/x'),
     'cannot read /mnt/ob/x: permission denied'),
    (PermissionError(errno.EACCES, 'Permission denied', '/mnt/ob'),
     'cannot read /mnt/ob: permission denied'),
    (PermissionError(errno.EACCES, 'Permission denied', '/mnt/o.partial'),  # (make_synthetic's.)
     'cannot write --out_dir=/mnt/o: permission denied (/mnt/o.partial)'),
    (PermissionError(errno.EACCES, 'Permission denied', '/mnt/.o.old-12'),  # (Mid-swap.)
     'cannot write --out_dir=/mnt/o: permission denied (/mnt/.o.old-12)'),
    (OSError(errno.EROFS, 'Read-only file system', '/mnt/.o.lock'),  # (Its lock: folderlock.)
     'cannot write --out_dir=/mnt/o: read-only file system (/mnt/.o.lock)'),
    (PermissionError(errno.EACCES, 'Permission denied'), None),  # Whose, unknown.
    (OSError(errno.ENOENT, 'No such file or directory', 'x.tif'), None),
    # The output, or a folder above it, that cannot be made (--out_dir=/proc/x/rec): its
    # ENOENT is the output's; in it (a file it should hold) or beside it, an input's.
    (OSError(errno.ENOENT, 'No such file or directory', '/mnt/o'),
     'cannot write --out_dir=/mnt/o: it cannot be made there (no such file or directory)'),
    (OSError(errno.ENOENT, 'No such file or directory', '/mnt'),
     'cannot write --out_dir=/mnt/o: it cannot be made there (no such file or directory)'),
    (OSError(errno.ENOENT, 'No such file or directory', '/mnt/o/manifest.json'), None),
    (OSError(errno.ENOENT, 'No such file or directory', '/mnt/ob'), None),
    (ValueError('--out_dir=/mnt/o: not a records folder'), None),
])
def test_write_failure_names_the_output_and_why(error, line):
  assert cli.write_failure(error, '--out_dir=/mnt/o') == line


def test_tensorflows_own_file_errors_are_write_failures_too():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # As TensorFlow 2.21 words them: the path after the op's device name.
  full = tf.errors.ResourceExhaustedError(None, None, (
      '{{function_node __wrapped__SaveV2_dtypes_3_device_/job:localhost/replica:0/task:0/device:'
      'CPU:0}} /runs/r/backup/ckpt-1_temp/part-00000; No space left on device [Op:SaveV2]'))
  assert cli.write_failure(full, '--model_dir=/runs/r') == (
      'cannot write --model_dir=/runs/r: no space left on the device '
      '(/runs/r/backup/ckpt-1_temp/part-00000)')
  read_only = tf.errors.PermissionDeniedError(None, None, '/runs/r/tensorboard; Read-only file '
                                              'system')
  assert cli.write_failure(read_only, '--model_dir=/runs/r').endswith(
      'read-only file system (/runs/r/tensorboard)')
  shard = tf.errors.PermissionDeniedError(None, None, (
      '{{function_node __wrapped__IteratorGetNext_device_/job:localhost/replica:0/task:0/device:'
      'CPU:0}} /data/records/train-00003-of-00032.tfrecord; Permission denied'))
  assert cli.write_failure(shard, '--model_dir=/runs/r') == (
      'cannot read /data/records/train-00003-of-00032.tfrecord: permission denied')
  assert cli.write_failure(tf.errors.NotFoundError(None, None, '/x; No such file'), 'o') is None


def test_a_full_disk_mid_run_is_one_line_and_leaves_no_finished_looking_output(tmp_path):
  """A tmpfs too small for the set: the disk fills while the patches are written."""
  mount = tmp_path / f'small-{uuid.uuid4().hex[:6]}'
  mount.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=96k', 'tmpfs', str(mount)],
                    capture_output=True).returncode:
    pytest.skip('cannot mount a tmpfs here (needs root); write_failure is unit-tested above')
  try:
    out = mount / 'synthetic'
    proc = run_tool('tools/make_synthetic.py', f'--out_dir={out}', '--num_train=400',
                    '--num_test=0')
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f'make_synthetic.py: error: cannot write --out_dir={out}: '
                                        'no space left on the device'], proc.stderr
    assert not out.exists()  # Only the clearly partial folder beside it.
  finally:
    subprocess.run(['umount', str(mount)], check=True)


@pytest.mark.parametrize('flag, message', [
    ('--batch_size=abc', "flag --batch_size=abc: invalid literal for int() with base 10: 'abc'"),
    ('--model=resnet', 'flag --model=resnet: value should be one of <baseline|batchnorm|resnet50v2|efficientnetv2b0>'),
    ('--flagfile=/nonexistent/x.flags',
     "Unable to open flagfile: [Errno 2] No such file or directory: '/nonexistent/x.flags'"),
    ('--no_such_flag=1', "Unknown command line flag 'no_such_flag'"),
])
def test_a_malformed_flag_is_one_line(flag, message):
  proc = run_tool('-m', 'pcam_tfdata.train', flag, '--model_dir=/tmp/unused')
  assert proc.returncode == 1
  assert proc.stderr.splitlines() == [f'train: error: {message}; see --help'], proc.stderr


def test_a_required_flag_left_out_is_named():
  proc = run_tool('tools/make_synthetic.py')
  assert proc.returncode == 1
  assert proc.stderr.splitlines() == ['make_synthetic.py: error: --out_dir is required; see --help']


def test_a_lost_peer_is_named_in_one_line(monkeypatch):
  """The survivor's error as TensorFlow 2.21 raised it when worker 1 was SIGKILLed."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import distribute  # pylint: disable=g-import-not-at-top
  error = tf.errors.UnavailableError(None, None, (
      'Graph execution error:\n\nDetected at node while/adam/CollectiveReduceV2 defined at ...\n'
      'Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error '
      'information from remote target /job:worker/replica:0/task:1 while calling '
      '/tensorflow.WorkerService/RecvBuf:\n[[{{node while/adam/CollectiveReduceV2}}]]'))
  monkeypatch.setenv('TF_CONFIG', '{"cluster": {"worker": ["a:1", "b:2"]}, '
                     '"task": {"type": "worker", "index": 0}}')
  assert distribute.peer_failure(error) == (
      'lost contact with worker 1 (recvmsg:Connection reset by peer): it stopped or its host '
      'went away; rerun every worker with the same command to resume from the last backup')
  assert distribute.peer_failure(tf.errors.InvalidArgumentError(None, None, 'x')) is None
  monkeypatch.delenv('TF_CONFIG')  # One process: an UnavailableError is not about a peer.
  assert distribute.peer_failure(error) is None


def test_a_dispatcher_that_forgot_the_job_is_one_line():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import service  # pylint: disable=g-import-not-at-top
  error = tf.errors.NotFoundError(None, None, (
      'Failed to get tasks: Unknown iteration client id 3000. The dispatcher is not configured '
      'to be fault tolerant, so this could be caused by a dispatcher restart.'))
  assert service.service_failure(error).startswith(
      'the tf.data service dispatcher restarted and no longer knows this run\'s job')
  assert service.service_failure(tf.errors.NotFoundError(None, None, 'other')) is None
