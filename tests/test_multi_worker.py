"""MultiWorkerMirroredStrategy across local processes, through tools/launch_local_cluster.py."""

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_tool, user_env

LAUNCHER = 'tools/launch_local_cluster.py'


def _train_flags(records, model_dir, epochs, model='baseline'):
  return [f'--records_dir={records}', f'--model_dir={model_dir}', f'--epochs={epochs}',
          '--batch_size=8', '--mixed_precision=off', '--seed=3', f'--model={model}']


def _workers_left(model_dir):
  return subprocess.run(['pgrep', '-f', f'pcam_tfdata.train.*{model_dir}'], capture_output=True,
                        text=True).stdout.split()


def _servers(stdout):
  """{worker: port} from each worker's start-up line about its unauthenticated server."""
  found = re.findall(r'\[worker (\d)\] TensorFlow gRPC server of this worker on '
                     r'127\.0\.0\.1:(\d+): it listens on every interface and is unauthenticated',
                     stdout)
  return {w: int(p) for w, p in found}


def _listening(port):
  with socket.socket() as s:
    return s.connect_ex(('127.0.0.1', port)) == 0


@pytest.mark.parametrize('model', ['baseline', 'batchnorm'])
def test_two_workers_end_with_identical_weights_and_only_the_chief_writes(records, tmp_path,
                                                                          model):
  model_dir = tmp_path / 'run'
  # BatchNorm: --sync_batch_norm=auto reduces its statistics over both workers,
  # so the moving averages, and every decision taken on val AUC, agree.
  epochs = 2 if model == 'batchnorm' else 1
  proc = run_tool(LAUNCHER, '--num_workers=2', '--', *_train_flags(records, model_dir, epochs,
                                                                   model), timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  digests = dict(re.findall(r'\[worker (\d)\] final weights sha256 (\w+)', proc.stdout))
  assert set(digests) == {'0', '1'} and digests['0'] == digests['1']
  # Each worker reads its own share of the shards.
  pipelines = dict(re.findall(r'\[worker (\d)\] input pipeline (\d) of 2', proc.stdout))
  assert pipelines == {'0': '0', '1': '1'}, proc.stdout[-3000:]
  assert '"strategy": "multi_worker"' in proc.stdout
  assert '"num_replicas_in_sync": 2' in proc.stdout
  assert f'"sync_batch_norm": {"true" if model == "batchnorm" else "false"}' in proc.stdout
  # The chief's outputs, and nothing of the other worker's scratch.
  assert (model_dir / 'model.keras').is_file() and (model_dir / 'metrics.json').is_file()
  assert sorted(p.name for p in model_dir.iterdir() if p.name.startswith('.')) == []
  assert not (model_dir / 'backup').exists()  # Removed once the run finished.
  # Each worker said it serves unauthenticated; none remains, nor does its port.
  ports = _servers(proc.stdout)
  assert set(ports) == {'0', '1'}, proc.stdout[-3000:]
  assert _workers_left(model_dir) == [] and not any(map(_listening, ports.values()))


def test_a_killed_worker_fails_the_launch_and_a_restart_resumes(records, tmp_path):
  model_dir = tmp_path / 'run'
  args = [sys.executable, LAUNCHER, '--num_workers=2', '--',
          *_train_flags(records, model_dir, 6)]
  # Files, not pipes: nobody reads a pipe while the workers run, and once its
  # buffer filled the launcher (and the workers) would block for good.
  out_path, err_path = tmp_path / 'launcher.out', tmp_path / 'launcher.err'
  with open(out_path, 'w') as out, open(err_path, 'w') as err:
    launcher = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=err, text=True,
                                env=user_env())
  deadline = time.time() + 300
  while not (model_dir / 'backup' / 'checkpoint').exists():  # Epoch 1 is done.
    assert time.time() < deadline and launcher.poll() is None, err_path.read_text()[-3000:]
    time.sleep(0.05)
  worker = subprocess.run(['pgrep', '-f', f'pcam_tfdata.train.*{model_dir}'],
                          capture_output=True, text=True).stdout.split()
  assert len(worker) == 2
  victim = max(worker, key=lambda pid: open(f'/proc/{pid}/environ', 'rb').read()
               .count(b'"index": 1'))
  os.kill(int(victim), signal.SIGKILL)
  launcher.wait(timeout=120)
  assert launcher.returncode != 0
  assert 'exited with status -9; stopped the others' in err_path.read_text()
  ports = _servers(out_path.read_text())
  assert len(ports) == 2 and _workers_left(model_dir) == []
  assert not any(map(_listening, ports.values()))
  assert not (model_dir / 'metrics.json').exists()

  proc = run_tool(LAUNCHER, '--num_workers=2', '--', *_train_flags(records, model_dir, 6),
                  timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  resumed = re.findall(r'\[worker (\d)\] resuming after epoch (\d)', proc.stdout)
  assert sorted(resumed) == [('0', resumed[0][1]), ('1', resumed[0][1])], proc.stdout[-3000:]
  assert 1 <= int(resumed[0][1]) <= 5  # Both restored the same finished epoch.
  digests = dict(re.findall(r'\[worker (\d)\] final weights sha256 (\w+)', proc.stdout))
  assert set(digests) == {'0', '1'} and digests['0'] == digests['1']
  with open(model_dir / 'history.csv') as f:
    epochs = [r['epoch'] for r in csv.DictReader(f)]
  assert epochs == [str(e) for e in range(1, len(epochs) + 1)]  # Each epoch once, in order.


def test_ctrl_c_on_the_launcher_leaves_no_worker_and_no_open_port(records, tmp_path):
  model_dir = tmp_path / 'run'
  out_path = tmp_path / 'launcher.out'
  with open(out_path, 'w') as out:
    launcher = subprocess.Popen([sys.executable, LAUNCHER, '--num_workers=2', '--',
                                 *_train_flags(records, model_dir, 50)], cwd=ROOT, stdout=out,
                                stderr=subprocess.PIPE, text=True, env=user_env())
  deadline = time.time() + 300
  while len(_servers(out_path.read_text())) < 2:  # Both workers are up.
    assert time.time() < deadline and launcher.poll() is None
    time.sleep(0.1)
  launcher.send_signal(signal.SIGINT)  # What Ctrl-C sends it.
  _, err = launcher.communicate(timeout=120)
  assert launcher.returncode == 130
  assert 'interrupted; stopped every worker' in err
  assert _workers_left(model_dir) == []
  assert not any(map(_listening, _servers(out_path.read_text()).values()))
