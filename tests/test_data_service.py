"""The tf.data service path: an in-process dispatcher and two workers."""

import gc
import importlib
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from pcam_tfdata import records as records_lib
from pcam_tfdata import schema
train = importlib.import_module('pcam_tfdata.train')  # The command's module.
from pcam_tfdata.training import augment as augment_lib
from pcam_tfdata.training import pipeline
from pcam_tfdata.training import service as service_lib
from conftest import ROOT, user_env


@pytest.fixture(scope='module')
def service():
  """A dispatcher and two workers in this process, on free loopback ports."""
  dispatcher = tf.data.experimental.service.DispatchServer()
  address = dispatcher.target.split('://')[1]
  workers = [tf.data.experimental.service.WorkerServer(
      tf.data.experimental.service.WorkerConfig(dispatcher_address=address)) for _ in range(2)]
  yield dispatcher.target
  gc.collect()  # The trainers' iterators of the endless job: stopping waits for their tasks.
  for w in workers:
    w.stop()
  dispatcher.stop()


def test_one_pass_yields_every_training_id_exactly_once(records, service):
  ds = service_lib.make_service_dataset(str(records), 'train', service, batch_size=1,
                                     with_ids=True, job_name='exactly_once')
  ids = [i.decode() for _, _, batch in ds for i in batch.numpy()]
  manifest = schema.load_manifest(str(records))
  assert len(ids) == len(set(ids)) == manifest['splits']['train']['count']
  expected = set()
  for r in tf.data.TFRecordDataset(records_lib.Records.open(records).shard_paths('train')):
    expected.add(tf.io.parse_single_example(r, schema.feature_spec())['id'].numpy().decode())
  assert set(ids) == expected


def _one_pass(records, **kwargs):
  """{id: image} of one pass of the streaming pipeline the service workers run."""
  ds = service_lib.make_streaming_dataset(str(records), 'train', batch_size=8, seed=1,
                                          with_ids=True, **kwargs)
  return {i.decode(): img for images, _, ids in ds
          for i, img in zip(ids.numpy(), images.numpy())}


def test_the_service_workers_pipeline_augments_when_asked(records):
  plain, flipped = _one_pass(records), _one_pass(records, augment=True)
  assert plain.keys() == flipped.keys() and len(plain) == 48
  for example_id, image in plain.items():  # A flip or rotation of its own image.
    views = [np.rot90(v, k) for v in (image, image[:, ::-1]) for k in range(4)]
    assert any(np.array_equal(flipped[example_id], v) for v in views), example_id
  assert sum(not np.array_equal(plain[i], flipped[i]) for i in plain) > len(plain) / 2


@pytest.mark.parametrize('where', ['stain_on_device', 'dihedral_on_device'])
def test_the_service_refuses_to_leave_augmentation_to_the_step(records, where, monkeypatch):
  """Its workers build whole batches, with no place for draws the step would apply."""
  def reached(*_):  # (Else a missing refusal would retry the dead address for ever.)
    raise AssertionError('the dataset reached the service')
  monkeypatch.setattr(tf.data.experimental.service, 'register_dataset', reached)
  options = augment_lib.Augment(dihedral=True, stain_jitter=0.05, **{where: True})
  with pytest.raises(ValueError, match=f'{where}=True: the tf.data service workers augment'):
    service_lib.make_service_dataset(records, 'train', 'grpc://localhost:1', batch_size=8,
                                     augment=options)


def test_training_reads_through_the_service(records, service, tmp_path, monkeypatch):
  """Every training batch is one that came out of the service's client dataset."""
  served = []
  real_from_dataset_id = tf.data.experimental.service.from_dataset_id

  def counted(*args, **kwargs):
    ds = real_from_dataset_id(*args, **kwargs)
    count = lambda *batch: tf.py_function(lambda: served.append(1) or 0, [], tf.int32)
    return ds.map(lambda *batch: (batch, count())).map(lambda batch, _: batch)

  def no_local_training(*args, training, **kwargs):
    assert not training, 'the local training pipeline was built'
    return real_make_dataset(*args, training=training, **kwargs)

  real_make_dataset = pipeline.make_dataset
  monkeypatch.setattr(tf.data.experimental.service, 'from_dataset_id', counted)
  monkeypatch.setattr(pipeline, 'make_dataset', no_local_training)
  config = train.Config(records_dir=str(records), model_dir=str(tmp_path / 'run'), epochs=2,
                        batch_size=8, eval_batch_size=16, mixed_precision='off',
                        strategy='default', seed=2, augment=True, data_service_address=service)
  metrics = train.run(config)
  assert metrics['epochs_run'] == 2
  steps = schema.load_manifest(str(records))['splits']['train']['count'] // 8
  # Prefetching may pull a few batches more than the steps taken, never fewer.
  assert len(served) >= 2 * steps


def _serve(role_flags, out):
  with open(out, 'w') as f:
    return subprocess.Popen([sys.executable, '-m', 'pcam_tfdata.data_service', *role_flags],
                            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=user_env())


@pytest.mark.slow  # (8 s; to keep the default tier within 4 minutes from a fresh clone)
def test_dispatcher_and_worker_say_the_port_they_bound_and_that_it_is_unauthenticated(tmp_path):
  out, worker_out = tmp_path / 'dispatcher.out', tmp_path / 'worker.out'
  procs = [_serve(['--role=dispatcher', '--port=0', f'--work_dir={tmp_path / "j"}'], out)]
  try:
    _wait_for('unauthenticated', out, procs[0], timeout=120)
    port = re.search(rf'serving on grpc://localhost:(\d+), journal in {tmp_path / "j"}',
                     out.read_text())[1]
    procs.append(_serve(['--role=worker', '--port=0', f'--dispatcher_address=localhost:{port}'],
                        worker_out))
    _wait_for('unauthenticated', worker_out, procs[1], timeout=120)
  finally:
    for proc in procs:
      proc.kill()
      proc.wait()
  assert port != '0'  # The port really bound, not the flag's 0.
  assert re.search(rf'dispatcher listens on port {port} of every interface, unauthenticated',
                   out.read_text())
  bound = re.search(rf'worker serving on port (\d+) for localhost:{port}', worker_out.read_text())
  assert bound and bound[1] != '0', worker_out.read_text()
  assert f'worker listens on port {bound[1]} of every interface' in worker_out.read_text()


def _wait_for(pattern, out, proc, timeout=300):
  deadline = time.time() + timeout
  while not re.search(pattern, out.read_text()):
    assert time.time() < deadline, out.read_text()[-3000:]
    assert proc.poll() is None, out.read_text()[-3000:]
    time.sleep(0.1)


@pytest.mark.slow
def test_a_dispatcher_restarted_with_its_work_dir_lets_the_run_complete(records, tmp_path):
  """Stopped mid-training and started again with the same --work_dir and --port: the run completes.

  Without the journal, the trainer fails at its next heartbeat to the new
  dispatcher ("not configured to be fault tolerant"); with it, it trains on.
  The dispatcher and worker run here; the trainer is the command.
  """
  from pcam_tfdata.commands import launch_local_cluster  # pylint: disable=g-import-not-at-top
  port = launch_local_cluster.free_ports(1)[0]
  config = lambda: service_lib.dispatcher_config(port, str(tmp_path / 'journal'))
  servers = tf.data.experimental.service
  dispatcher = servers.DispatchServer(config())
  worker = servers.WorkerServer(servers.WorkerConfig(dispatcher_address=f'localhost:{port}'))
  out = tmp_path / 'trainer.out'
  with open(out, 'w') as f:
    trainer = subprocess.Popen(
        [sys.executable, '-m', 'pcam_tfdata.train', f'--records_dir={records}',
         f'--model_dir={tmp_path / "run"}', '--epochs=30', '--batch_size=8',
         '--early_stopping_patience=1000', '--mixed_precision=off', '--strategy=default',
         '--noprogress', f'--data_service_address=grpc://localhost:{port}'],
        cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=user_env())
  try:
    _wait_for(r'epoch=1 ', out, trainer)
    dispatcher._stop()  # pylint: disable=protected-access
    dispatcher = servers.DispatchServer(config())
    # Dozens of epochs (and heartbeats) left with the new dispatcher: the run completes.
    assert len(re.findall(r'epoch=\d+ ', out.read_text())) < 10
    assert trainer.wait(timeout=600) == 0, out.read_text()[-3000:]
    assert json.loads((tmp_path / 'run' / 'metrics.json').read_text())['epochs_run'] == 30
  finally:
    if trainer.poll() is None:
      trainer.kill()
    trainer.wait()
    worker._stop()  # pylint: disable=protected-access
    dispatcher._stop()  # pylint: disable=protected-access
