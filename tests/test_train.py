"""Models, precision, strategies, the training loop, resumption, evaluation and submission."""

import builtins
import csv
import dataclasses
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import types
import zipfile

from absl import flags
import keras
import numpy as np
import pytest
import tensorflow as tf

import pcam_tfdata
from pcam_tfdata import records as records_lib
from pcam_tfdata import report
train = importlib.import_module('pcam_tfdata.train')  # The command's module.
from pcam_tfdata.training import augment
from pcam_tfdata.training import backup
from pcam_tfdata.training import config as config_lib
from pcam_tfdata.training import distribute
from pcam_tfdata.training import epochs as epochs_lib
from pcam_tfdata.training import loop
from pcam_tfdata.training import models
from pcam_tfdata.training import pipeline
from pcam_tfdata.training import preemption
from pcam_tfdata.training import resume
from pcam_tfdata.training import trainer
from pcam_tfdata.training import verify
from conftest import (ROOT, cut_after_first_record, error_lines, flip_a_byte, run_convert,
                      run_tool, synthetic_records)
import replica_steps as rs


@pytest.fixture(autouse=True)
def float32_policy():
  yield
  keras.mixed_precision.set_global_policy('float32')


@pytest.fixture(scope='module')
def learnable_records(tmp_path_factory):
  """400 synthetic patches: enough for a model to learn the center cluster."""
  return synthetic_records(tmp_path_factory.mktemp('learnable'), num_train=400, num_test=0,
                           seed=11, per_class=0, val_fraction=0.25)


def _config(records, model_dir, **kwargs):
  kwargs.setdefault('epochs', 1)
  kwargs.setdefault('batch_size', 8)
  kwargs.setdefault('eval_batch_size', 16)
  kwargs.setdefault('mixed_precision', 'off')
  kwargs.setdefault('strategy', 'default')
  kwargs.setdefault('seed', 1)
  return train.Config(records_dir=str(records), model_dir=str(model_dir), **kwargs)


@pytest.mark.parametrize('name, params', [('baseline', 355649), ('batchnorm', 1422721),
                                          ('resnet50v2', 23566849),
                                          ('efficientnetv2b0', 5920593)])
def test_parameter_counts(name, params):
  # (The applications without their top, plus a 1-unit head: 2,049 and 1,281 parameters.)
  model = models.build_model(name)
  assert model.count_params() == params
  # The TF-free copies the flags are checked against say the same of it.
  assert (name in config_lib.APPLICATIONS) == (name in models.APPLICATIONS)
  assert (name in config_lib.BATCH_NORM_MODELS) == any(
      isinstance(l, keras.layers.BatchNormalization) for l in models.sublayers(model))


def test_the_flags_name_every_model():
  assert config_lib.MODEL_NAMES == models.MODELS
  assert config_lib.APPLICATIONS == models.APPLICATIONS


def test_unknown_model_is_refused():
  with pytest.raises(ValueError, match="unknown model 'resnet'"):
    models.build_model('resnet')


@pytest.mark.parametrize('name', models.APPLICATIONS)
def test_an_application_takes_uint8_and_synchronizes_every_batch_norm(name, mirrored):
  with mirrored.scope():
    model = models.build_model(name, (40, 40, 3), sync_batch_norm=True)
  norms = [l for l in models.sublayers(model)
           if isinstance(l, keras.layers.BatchNormalization)]
  assert norms and all(l.synchronized for l in norms)
  assert model.inputs[0].dtype == 'uint8' and model.outputs[0].dtype == 'float32'
  probs = model(np.zeros((2, 40, 40, 3), np.uint8), training=False).numpy()
  assert probs.shape == (2, 1) and ((0 < probs) & (probs < 1)).all()


def test_a_run_with_a_backup_to_resume_does_not_fetch_imagenet_weights(tmp_path, monkeypatch):
  """The backup replaces them: a preempted run resumes offline (and --restart fetches)."""
  from keras.src.utils import file_utils  # pylint: disable=g-import-not-at-top
  fetched = []

  def offline(fname, origin=None, **_):
    fetched.append(origin)
    raise Exception(f'URL fetch failure on {origin}: no network')

  monkeypatch.setattr(file_utils, 'get_file', offline)
  backup_dir = tmp_path / 'run' / 'backup'
  backup_dir.mkdir(parents=True)
  (backup_dir / 'checkpoint').write_text('model_checkpoint_path: "ckpt-6"\n')
  (backup_dir / 'ckpt-6.index').write_bytes(b'')
  config = _config('unused', tmp_path / 'run', model='efficientnetv2b0', weights='imagenet')
  setup = types.SimpleNamespace(strategy=tf.distribute.get_strategy(), sync_batch_norm=False,
                                policy='float32')
  records = types.SimpleNamespace(image_shape=(32, 32, 3))
  model, _ = trainer.build_model(config, records, setup, steps_per_epoch=1)
  assert model.name == 'efficientnetv2b0' and fetched == []
  with pytest.raises(ValueError, match='could not fetch or load the efficientnetv2b0'):
    trainer.build_model(dataclasses.replace(config, restart=True), records, setup, 1)
  assert len(fetched) == 1


def test_every_dropout_of_an_application_draws_its_own_mask_on_each_replica(mirrored):
  """EfficientNetV2B0's stochastic depth (15 Dropout layers, one draw per image): each
  replica its own draws, reproducibly (a replica's is a function of the seed)."""
  def draws(seed):
    keras.utils.set_random_seed(seed)
    with mirrored.scope():
      model = models.build_model('efficientnetv2b0', (32, 32, 3))
    dropouts = [l for l in models.sublayers(model) if isinstance(l, keras.layers.Dropout)]
    ones = tf.ones([1024, 1, 1, 1])  # (Per image: noise_shape (None, 1, 1, 1).)
    run = tf.function(lambda: mirrored.run(lambda: [l(ones, training=True) for l in dropouts]))
    per_replica = [mirrored.experimental_local_results(m) for m in run()]
    return [[r.numpy().ravel() != 0 for r in replicas] for replicas in per_replica]

  masks = draws(1)
  assert len(masks) == 15
  for first, second in masks:
    assert not first.all() and (first != second).any()  # Dropped some, and not alike.
  for drawn, redrawn in zip(masks, draws(1)):
    np.testing.assert_array_equal(drawn, redrawn)


@pytest.fixture(scope='module')
def records_96(tmp_path_factory):
  """24 synthetic patches stored whole (--crop_size=96): 16 train, 4 val, 4 test."""
  return synthetic_records(tmp_path_factory.mktemp('records96'), num_train=20, num_test=4,
                           seed=3, crop_size=96, per_class=0)


@pytest.mark.slow
@pytest.mark.parametrize('strategy', ['default', 'mirrored'])
@pytest.mark.parametrize('name', models.APPLICATIONS)
def test_an_application_trains_at_96_px_and_predicts_with_tta(records_96, tmp_path, name,
                                                               strategy, request):
  dist = request.getfixturevalue('mirrored') if strategy == 'mirrored' else None
  run_dir = tmp_path / 'run'
  metrics = train.run(_config(records_96, run_dir, model=name, epochs=1, batch_size=8,
                              augment=True, strategy=strategy), strategy=dist)
  assert metrics['model'] == name and metrics['num_replicas_in_sync'] == (
      2 if strategy == 'mirrored' else 1)
  assert metrics['sync_batch_norm'] is (strategy == 'mirrored')
  assert json.loads((run_dir / 'metrics.json').read_text())['params'] == (
      models.build_model(name, (96, 96, 3)).count_params())
  ids, probs = pcam_tfdata.predict(str(run_dir), str(records_96), tta=True)
  assert len(ids) == 4 and probs.shape == (4,) and ((0 < probs) & (probs < 1)).all()
  # The mean of the model's predictions on the 8 flips and rotations of each patch.
  model = keras.models.load_model(run_dir / 'model.keras')
  images, _, test_ids = next(iter(pipeline.make_dataset(str(records_96), 'test', batch_size=4,
                                                        training=False, with_ids=True)))
  assert [i.decode() for i in test_ids.numpy()] == list(ids)
  views = [np.rot90(images.numpy(), k, axes=(1, 2)) for k in range(4)]
  views += [v[:, :, ::-1] for v in views]
  expected = np.mean([model.predict(np.ascontiguousarray(v), verbose=0)[:, 0] for v in views], 0)
  assert len({v.tobytes() for v in views}) == 8  # (The 8 views differ.)
  np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)


def test_an_application_refuses_small_images_and_weights_it_cannot_fetch(monkeypatch):
  with pytest.raises(ValueError, match=r'^--model=resnet50v2 needs images of at least 32x32; '
                     r'the records hold 16x16 \(--crop_size\)$'):
    models.build_model('resnet50v2', (16, 16, 3))
  from keras.src.utils import file_utils  # pylint: disable=g-import-not-at-top

  def offline(fname, origin=None, **_):
    raise Exception(f'URL fetch failure on {origin}: None -- [Errno -3] no network')

  monkeypatch.setattr(file_utils, 'get_file', offline)
  from keras.src.backend import config as keras_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r'^--weights=imagenet: could not fetch or load the '
                     r'efficientnetv2b0 ImageNet weights \(URL fetch failure on https://\S+'
                     r'efficientnetv2-b0_notop.h5: None -- \[Errno -3\] no network\); '
                     r'offline, copy efficientnetv2-b0_notop.h5 \(from https://\S+'
                     r'efficientnetv2-b0_notop.h5\) into ' + re.escape(
                         os.path.join(keras_config.keras_home(), 'models')) +
                     r", Keras' cache, or train with --weights=none$"):
    models.build_model('efficientnetv2b0', (32, 32, 3), weights='imagenet')
  with pytest.raises(ValueError, match='--weights=imagenet: --model=baseline has no published'):
    models.build_model('baseline', weights='imagenet')


def test_sync_batch_norm_keeps_the_weights_and_loads_on_one_device(tmp_path, mirrored):
  with mirrored.scope():
    synced = models.build_model('batchnorm', sync_batch_norm=True)
  plain = models.build_model('batchnorm')
  assert synced.count_params() == plain.count_params() == 1_422_721  # The seed's count.
  assert all(l.synchronized for l in synced.layers if 'bn' in l.name)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  expected = synced(images, training=False).numpy()
  synced.save(tmp_path / 'model.keras')
  loaded = keras.models.load_model(tmp_path / 'model.keras')  # Default strategy: one device.
  np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, rtol=1e-6)


def test_replicas_draw_their_rows_of_the_global_batchs_dropout_mask(mirrored, tmp_path,
                                                                     monkeypatch):
  """Keras seeds dropout from one mirrored state: every replica drew one mask. Now each
  draws its rows of the global batch's mask: independent within a step, and on one device
  the same mask over the same global batch (a resume on another number of replicas)."""
  masks = rs.dropout_masks(mirrored)
  for first, second in masks:
    assert 0.4 < first.mean() < 0.6 and 0.4 < second.mean() < 0.6  # Rate 0.5, kept/dropped.
    assert (first != second).mean() > 0.3  # Independent: half the entries differ.
  assert (masks[0][0] != masks[1][0]).mean() > 0.3  # A new mask each step,
  # and not a shifted sequence (replica 1's at one step as replica 0's at the next).
  assert (masks[0][1] != masks[1][0]).mean() > 0.3
  again = rs.dropout_masks(mirrored)
  for drawn, redrawn in zip(masks, again):  # and the same ones from the same seed.
    np.testing.assert_array_equal(drawn, redrawn)
  # One device over the global batch (2 x 8 rows): the two replicas' masks, stacked.
  one = rs.dropout_masks(tf.distribute.get_strategy(), rows=16)
  for (first, second), (whole,) in zip(masks, one):
    np.testing.assert_array_equal(np.concatenate([first, second]), whole)
  # Saved, the layer is stock Keras: only this instance's call is replaced.
  keras.utils.set_random_seed(1)
  with mirrored.scope():
    model = models.build_model('batchnorm')
  assert 'call' in vars(model.get_layer('dropout'))
  model.save(tmp_path / 'model.keras')
  config = json.loads(zipfile.ZipFile(tmp_path / 'model.keras').read('config.json'))
  saved = next(l for l in config['config']['layers'] if l['name'] == 'dropout')
  assert (saved['module'], saved['class_name'], saved['registered_name']) == (
      'keras.layers', 'Dropout', None)
  loaded = keras.saving.load_model(tmp_path / 'model.keras').get_layer('dropout')
  assert type(loaded) is keras.layers.Dropout and 'call' not in vars(loaded)
  # One device draws Keras' own masks.
  monkeypatch.setattr(models, 'global_batch_dropout', lambda layer: layer)
  np.testing.assert_array_equal(one, rs.dropout_masks(tf.distribute.get_strategy(), rows=16))


@pytest.mark.parametrize('mode, replicas, expected', [
    ('auto', 1, False), ('auto', 2, True), ('on', 1, True), ('off', 2, False)])
def test_sync_batch_norm_auto_means_more_than_one_replica(mode, replicas, expected):
  assert distribute.resolve_sync_batch_norm(mode, replicas) is expected


@pytest.mark.parametrize('mode, gpus, expected', [
    ('auto', [], False), ('auto', ['GPU:0'], True), ('on', [], True), ('off', ['GPU:0'], False)])
def test_jit_compile_auto_decides_as_keras(monkeypatch, mode, gpus, expected):
  monkeypatch.setattr(tf.config, 'list_physical_devices',
                      lambda kind=None: list(gpus) if kind == 'GPU' else [])
  assert distribute.resolve_jit_compile(mode, tf.distribute.get_strategy()) is expected


def test_jit_compile_auto_is_off_under_several_replicas(monkeypatch, mirrored):
  monkeypatch.setattr(tf.config, 'list_physical_devices',
                      lambda kind=None: ['GPU:0'] if kind == 'GPU' else [])
  assert distribute.resolve_jit_compile('auto', mirrored) is False


@pytest.mark.parametrize('mode, tensor_cores, compute', [
    ('off', False, 'float32'), ('float16', False, 'float16'), ('bfloat16', False, 'bfloat16'),
    ('auto', False, 'float32'), ('auto', True, 'float16'), ('off', True, 'float32')])
def test_precision_policies(monkeypatch, mode, tensor_cores, compute):
  # Whether this host has tensor-core GPUs must not change what the test means.
  monkeypatch.setattr(distribute, '_tensor_core_gpus', lambda: tensor_cores)
  distribute.set_precision(mode)
  model = models.build_model('batchnorm')
  out = model(np.zeros((2, 32, 32, 3), np.uint8), training=False)
  assert out.dtype == tf.float32  # The sigmoid stays in float32.
  assert model.get_layer('block1_conv').compute_dtype == compute
  assert {v.dtype for v in model.weights} == {'float32'}  # Variables stay float32.


@pytest.mark.parametrize('capabilities, expected', [
    ([], False), ([(8, 0)], True), ([(7, 0), (9, 0)], True), ([(6, 1)], False),
    ([(8, 6), (6, 1)], False)])
def test_tensor_cores_means_every_gpu_has_them(monkeypatch, capabilities, expected):
  gpus = [f'GPU:{i}' for i in range(len(capabilities))]
  details = dict(zip(gpus, capabilities))
  monkeypatch.setattr(tf.config, 'list_physical_devices', lambda kind: gpus if kind == 'GPU'
                      else [])
  monkeypatch.setattr(tf.config.experimental, 'get_device_details',
                      lambda gpu: {'compute_capability': details[gpu]})
  assert distribute._tensor_core_gpus() is expected


@pytest.mark.parametrize('cluster, task_type, task_id, expected', [
    ({'worker': ['a', 'b']}, 'worker', 0, 0), ({'worker': ['a', 'b']}, 'worker', 1, 1),
    ({'chief': ['c'], 'worker': ['a', 'b']}, 'chief', 0, 0),
    ({'chief': ['c'], 'worker': ['a', 'b']}, 'worker', 0, 1),
    ({'chief': ['c'], 'worker': ['a', 'b']}, 'worker', 1, 2),
    ({}, None, None, 0)])  # MultiWorkerMirroredStrategy without TF_CONFIG: one local worker.
def test_input_pipeline_ids_number_the_chief_first(cluster, task_type, task_id, expected):
  assert distribute.id_in_cluster(cluster, task_type, task_id) == expected


@pytest.mark.parametrize('name', ['baseline', 'batchnorm'])
def test_a_step_under_mirrored_strategy_on_two_cpus(name, mirrored):
  strategy = mirrored
  assert strategy.num_replicas_in_sync == 2
  with strategy.scope():
    model = models.build_model(name)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
  before = [w.copy() for w in model.get_weights()]
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 2, 8).astype(np.float32)
  ds = tf.data.Dataset.from_tensors((images, labels)).repeat(2)
  dist = strategy.experimental_distribute_dataset(ds)
  step = loop.make_train_fn(model, optimizer, strategy, global_batch_size=8)
  loss_sum, correct = step(iter(dist), tf.constant(2))
  assert np.isfinite(float(loss_sum)) and 0 <= float(correct) <= 16
  assert int(optimizer.iterations.numpy()) == 2
  assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.slow  # (25 s; the trainer's input on 2 replicas is checked in the default tier,
# tests/test_topology.py.)
def test_run_under_mirrored_strategy_writes_every_output(records, tmp_path, mirrored):
  metrics = train.run(_config(records, tmp_path / 'run', epochs=2, augment=True,
                              stain_jitter=0.1, stain_jitter_on='device'), strategy=mirrored)
  assert metrics['strategy'] == 'mirrored' and metrics['num_replicas_in_sync'] == 2
  assert metrics['precision_policy'] == 'float32'
  assert metrics['augment'] is True and metrics['stain_jitter'] == 0.1
  assert metrics['stain_jitter_on'] == 'device' and np.isfinite(metrics['train_loss'])
  for name in ('metrics.json', 'history.csv', 'model.keras', 'training_curves.png',
               'confusion_matrix.png', 'roc_curve.png'):
    assert (tmp_path / 'run' / name).is_file(), name
  on_disk = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
  for key in ('train_accuracy', 'train_auc', 'val_accuracy', 'val_auc'):
    assert 0 <= on_disk[key] <= 1
  with open(tmp_path / 'run' / 'history.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['epoch'] for r in rows] == ['1', '2'] and list(rows[0])[0] == 'epoch'


def test_batch_not_divisible_by_replicas(records, tmp_path, mirrored):
  with pytest.raises(ValueError, match='--batch_size=7 is not divisible by the 2 replicas'):
    train.run(_config(records, tmp_path / 'run', batch_size=7), strategy=mirrored)


def test_xla_with_synchronized_batch_norm_over_replicas_is_refused(records, tmp_path,
                                                                     mirrored):
  with pytest.raises(ValueError, match='--jit_compile=on cannot compile synchronized BatchNorm '
                     'over 2 replicas; use --jit_compile=off or --sync_batch_norm=off'):
    train.run(_config(records, tmp_path / 'run', model='batchnorm', jit_compile='on',
                      seed=None), strategy=mirrored)
  assert not (tmp_path / 'run').exists()  # Refused before anything was written.


def test_xla_with_a_seed_on_gpus_is_refused(records, tmp_path, monkeypatch):
  """On GPU hosts --seed turns op determinism on, under which XLA fails its first step."""
  real = tf.config.list_physical_devices
  monkeypatch.setattr(tf.config, 'list_physical_devices',
                      lambda kind=None: ['GPU:0'] if kind == 'GPU' else real(kind))
  with pytest.raises(ValueError, match='--jit_compile=on with --seed on GPUs'):
    train.run(_config(records, tmp_path / 'run', jit_compile='on'))


def _steps_from(records, options, strategy, steps=6):
  """Weights after `steps` Adam steps of the Baseline CNN from fixed weights on seeded batches."""
  keras.utils.set_random_seed(0)
  with strategy.scope():
    model = models.build_model('baseline')
    model.get_layer('dropout').rate = 0.0  # The same run but for the inputs.
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
  ds = pipeline.make_dataset(str(records), 'train', batch_size=8, training=True, seed=1,
                             augment=options)
  if strategy.num_replicas_in_sync > 1:  # Each replica its images' own stain draws.
    ds = strategy.experimental_distribute_dataset(ds)
  loop.make_train_fn(model, optimizer, strategy, 8)(iter(ds), tf.constant(steps))
  return model.get_weights()


@pytest.mark.slow  # 11 s: the default tier keeps its 4 minutes (the host/device test stays).
def test_augmentation_in_the_training_step_trains_as_in_the_pipeline(records, mirrored,
                                                                      monkeypatch):
  """The same draws applied in each replica's compiled step or in the pipeline: the same
  weights, bit for bit, for the stain jitter, the dihedral transform and both. (That each
  changes the images, and so the training: tests/test_pipeline.py.)"""
  in_step = []  # Traces of the training step's augmentations.
  monkeypatch.setattr(loop, 'augment', types.SimpleNamespace(
      apply_stain=lambda *a: in_step.append('stain') or augment.apply_stain(*a),
      apply_dihedral_ids=lambda *a: in_step.append('dihedral') or augment.apply_dihedral_ids(*a)))
  runs = {}
  for name, device in (('host', ()), ('stain', ('stain',)), ('dihedral', ('dihedral',)),
                       ('both', ('dihedral', 'stain'))):
    in_step.clear()
    runs[name] = _steps_from(records, augment.Augment(
        dihedral=True, stain_jitter=0.05, stain_on_device='stain' in device,
        dihedral_on_device='dihedral' in device), mirrored)
    # Traced once per replica, in this order.
    assert in_step == [*device] * mirrored.num_replicas_in_sync, name
  for name in ('stain', 'dihedral', 'both'):
    for host, device in zip(runs['host'], runs[name]):
      np.testing.assert_array_equal(host, device)


# Slow tier (29 s for BatchNorm, 7 s for the Baseline, of a default tier near its 4 minutes);
# the trainer's draws for either place are checked in the default tier (test_topology.py).
@pytest.mark.slow
@pytest.mark.parametrize('model', ['baseline', 'batchnorm'])
def test_seeded_runs_augmented_on_host_or_device_end_with_equal_weights(records, tmp_path, model):
  """Two epochs through `train.run`, dropout and all: only where the dihedral transform
  (--augment_on) and the stain jitter (--stain_jitter_on) run differs."""
  weights, history = {}, {}
  for dihedral, stain in (('host', 'host'), ('device', 'host'), ('device', 'device')):
    run_dir = tmp_path / f'{dihedral}-{stain}'
    metrics = train.run(_config(records, run_dir, model=model, epochs=2, augment=True,
                                augment_on=dihedral, stain_jitter=0.05, stain_jitter_on=stain,
                                seed=7))
    assert (metrics['augment_on'], metrics['stain_jitter_on']) == (dihedral, stain)
    weights[run_dir.name] = keras.saving.load_model(run_dir / 'model.keras').get_weights()
    with open(run_dir / 'history.csv') as f:
      history[run_dir.name] = [
          {k: v for k, v in row.items() if k not in ('seconds', 'images_per_second')}
          for row in csv.DictReader(f)]
  for name in ('device-host', 'device-device'):
    for host, device in zip(weights['host-host'], weights[name]):
      np.testing.assert_array_equal(host, device)
    assert history['host-host'] == history[name]


@pytest.mark.parametrize('where, expected', [('host', 'host'), ('device', 'device'),
                                             ('auto', 'host')])
def test_where_the_augmentations_run(records, tmp_path, where, expected, monkeypatch):
  """On this CPU-only host, `auto` is the pipeline; with a GPU, the step. Never the step
  with the tf.data service, nor for an augmentation that is off."""
  config = _config(records, tmp_path / 'run', augment=True, augment_on=where, stain_jitter=0.05,
                   stain_jitter_on=where)
  assert trainer.stain_on_device(config) == (expected == 'device')
  assert trainer.dihedral_on_device(config) == (expected == 'device')
  assert trainer.stain_on_device(dataclasses.replace(config, stain_jitter=0.0)) is False
  assert trainer.dihedral_on_device(dataclasses.replace(config, augment=False)) is False
  served = dataclasses.replace(config, data_service_address='grpc://localhost:1')
  assert not trainer.stain_on_device(served) and not trainer.dihedral_on_device(served)
  real = tf.config.list_logical_devices
  for accelerator in ('GPU', 'TPU'):
    monkeypatch.setattr(tf.config, 'list_logical_devices',
                        lambda kind=None, a=accelerator: [f'{a}:0'] if kind == a else real(kind))
    assert trainer.stain_on_device(config) == (where != 'host'), accelerator
    assert trainer.dihedral_on_device(config) == (where != 'host'), accelerator


@pytest.mark.slow
def test_profile_steps_traces_those_steps_of_the_first_epoch_once(records, tmp_path,
                                                                  monkeypatch):
  """Slow tier: in a process that has run many graphs (a test worker), the trace took 35 s."""
  traces = []
  for name in ('start', 'stop'):
    real = getattr(tf.profiler.experimental, name)
    monkeypatch.setattr(tf.profiler.experimental, name,
                        lambda *a, name=name, real=real: traces.append(name) or real(*a))
  train.run(_config(records, tmp_path / 'run', epochs=2, profile_steps=(1, 3)))
  assert traces == ['start', 'stop']
  assert list((tmp_path / 'run' / 'tensorboard' / 'plugins' / 'profile').glob('*/*.xplane.pb'))


def test_exact_metrics_match_a_recomputation(learnable_records, tmp_path):
  """The demo model learns, and metrics.json holds the exact whole-split figures."""
  metrics = train.run(_config(learnable_records, tmp_path / 'run', epochs=4, batch_size=16,
                              model='baseline'))
  assert metrics['val_auc'] > 0.8, metrics
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import evaluate, pipeline  # pylint: disable=g-import-not-at-top
  model = keras.models.load_model(tmp_path / 'run' / 'model.keras')
  ds = pipeline.make_dataset(str(learnable_records), 'val', batch_size=7, training=False,
                             with_ids=True)
  probs, labels, ids = evaluate.predict(evaluate.make_predict_fn(model), ds)
  assert len(ids) == len(set(ids)) == 100
  assert metrics['val_auc'] == pytest.approx(roc_auc_score(labels, probs), abs=1e-6)
  ds = pipeline.make_dataset(str(learnable_records), 'train', batch_size=7, training=False,
                             with_ids=True)
  probs, labels, ids = evaluate.predict(evaluate.make_predict_fn(model), ds)
  assert len(ids) == len(set(ids)) == 300  # Every train example, not the last batch dropped.
  assert metrics['train_auc'] == pytest.approx(roc_auc_score(labels, probs), abs=1e-6)


def test_the_trainers_pipelines_are_what_the_flags_say(records, monkeypatch):
  made = []
  monkeypatch.setattr(pipeline, 'make_dataset',
                      lambda records, split, **kw: made.append((split, kw)) or split)
  config = _config(records, 'unused', augment=True, stain_jitter=0.02, augment_cache_gib=0.5,
                   seed=7, epochs=5, eval_batch_size=24)
  data = trainer._datasets(config, records_lib.Records.open(records),  # pylint: disable=protected-access
                           types.SimpleNamespace(stain_on_device=False, dihedral_on_device=True,
                                                 data_seed=7, order='per_pipeline'))
  assert (data['val'], data['train_eval']) == ('val', 'train')
  for _, kw in made:  # Evaluation: every example once, with ids.
    assert (kw['training'], kw['with_ids'], kw['batch_size']) == (False, True, 24)
  data['train'](tf.distribute.InputContext(), 3, 4)
  split, kw = made[-1]
  assert split == 'train' and kw['training']
  assert kw['augment'] == augment.Augment(dihedral=True, stain_jitter=0.02,
                                          stain_on_device=False, variant_budget=2**29,
                                          dihedral_on_device=True)
  assert (kw['seed'], kw['first_epoch'], kw['num_epochs'], kw['batches_per_epoch'],
          kw['batch_size'], kw['order']) == (7, 3, 3, 4, 8, 'per_pipeline')


def test_a_resumed_run_trains_at_the_learning_rate_it_had_reached(records, tmp_path,
                                                                   monkeypatch):
  run_dir = tmp_path / 'run'
  real_train_epoch = epochs_lib.EpochLoop._train_epoch  # pylint: disable=protected-access

  def stopped_in_epoch_2(self, epoch, *args, **kwargs):
    if epoch == 2:  # After epoch 1's backup.
      raise KeyboardInterrupt
    return real_train_epoch(self, epoch, *args, **kwargs)

  monkeypatch.setattr(epochs_lib.EpochLoop, '_train_epoch', stopped_in_epoch_2)
  with pytest.raises(KeyboardInterrupt):
    train.run(_config(records, run_dir, epochs=2, early_stopping_patience=5))
  monkeypatch.setattr(epochs_lib.EpochLoop, '_train_epoch', real_train_epoch)
  real_restore = backup.Backup.restore

  def cut_twice(self):  # As if ReduceLROnPlateau had halved the rate twice before the stop.
    epoch, saved = real_restore(self)
    saved['learning_rate'] = 2.5e-4
    return epoch, saved

  monkeypatch.setattr(backup.Backup, 'restore', cut_twice)
  train.run(_config(records, run_dir, epochs=2, early_stopping_patience=5))
  with open(run_dir / 'history.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['epoch'] for r in rows] == ['1', '2']
  assert float(rows[1]['learning_rate']) == pytest.approx(2.5e-4)


def test_compiled_calls_end_on_a_grid_fixed_by_the_step_number():
  """So a run resumed at any backup makes the uninterrupted run's calls (and float sums)."""
  run = types.SimpleNamespace(steps=10, config=types.SimpleNamespace(steps_per_execution=4,
                                                                      backup_every_steps=3))

  def ends(done):
    out = []
    while done < run.steps:
      done += epochs_lib.EpochLoop._chunk(run, done)  # pylint: disable=protected-access
      out.append(done)
    return out

  assert ends(0) == [3, 4, 6, 8, 9, 10]  # Every 4 steps, and a backup every 3.
  for start in ends(0)[:-1]:  # Resumed at any of them: the same calls from there.
    assert ends(start) == [e for e in ends(0) if e > start]
  run.config.backup_every_steps = 0
  assert ends(0) == [4, 8, 10]


def test_epochs_may_not_fall_below_an_epoch_a_backup_has_begun():
  assert resume.epochs_begun({'epoch': 2, 'step': 3}) == 3  # Stopped in epoch 3.
  assert resume.epochs_begun({'epoch': 2, 'step': 0}) == 2
  assert resume.epochs_begun({'callbacks': {}}) is None and resume.epochs_begun(None) is None
  current = {**{key: None for key in resume._NAMES}, 'epochs': 2,  # pylint: disable=protected-access
             'input_order': 'global'}
  with pytest.raises(ValueError, match=r'--epochs: 5 then, 2 now, fewer than the 3 trained'):
    resume.check({'epochs': 5}, current, 'backup', trained=3)
  said = []
  resume.check({'epochs': 5}, {**current, 'epochs': 3}, 'backup', log=said.append, trained=3)
  assert said == ['continuing with --epochs=3 (the run was started with --epochs=5)']


def test_a_signal_after_the_last_step_stops_the_chief_before_its_final_evaluation(
    records, tmp_path, monkeypatch, capsys):
  """Past the last point where workers agree: the backup of the last epoch is there to rerun."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers are the main thread\'s')
  real_end_epoch = epochs_lib.EpochLoop._end_epoch  # pylint: disable=protected-access

  def signalled_in_validation(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # Caught: the trainer's watch is on.
    return real_end_epoch(self, *args, **kwargs)

  monkeypatch.setattr(epochs_lib.EpochLoop, '_end_epoch', signalled_in_validation)
  model_dir = tmp_path / 'run'
  with pytest.raises(preemption.Preempted, match='preempted at epoch 1, step 6: backup saved'):
    train.run(_config(records, model_dir, epochs=1))
  assert not (model_dir / 'metrics.json').exists()
  monkeypatch.undo()
  capsys.readouterr()
  train.run(_config(records, model_dir, epochs=1))  # The same command: evaluated, not trained.
  out = capsys.readouterr().out
  assert f'the run in {model_dir} has finished (all 1 epochs)' in out and 'epoch=' not in out
  assert json.loads((model_dir / 'metrics.json').read_text())['epochs_run'] == 1


def test_a_worker_signalled_in_its_last_validation_ends_as_usual(records, tmp_path, monkeypatch,
                                                                 capsys):
  """Not the chief: its work is done, and a status of 42 would tell a launcher or a cluster
  manager that the run stopped while the chief evaluates."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers are the main thread\'s')
  real_end_epoch = epochs_lib.EpochLoop._end_epoch  # pylint: disable=protected-access
  calls = []

  def signalled_in_validation(self, *args, **kwargs):
    calls.append(self.setup.chief)
    os.kill(os.getpid(), signal.SIGTERM)
    return real_end_epoch(self, *args, **kwargs)

  monkeypatch.setattr(epochs_lib.EpochLoop, '_end_epoch', signalled_in_validation)
  monkeypatch.setattr(distribute, 'is_chief', lambda strategy: False)
  watches, real_init = [], preemption.Watch.__init__

  def keep(self, *args):
    real_init(self, *args)
    watches.append(self)

  monkeypatch.setattr(preemption.Watch, '__init__', keep)
  assert train.run(_config(records, tmp_path / 'run', epochs=1)) == {}  # No Preempted.
  assert calls == [False] and watches[0].signalled  # (Signalled, not the chief.)
  assert 'final weights sha256' in capsys.readouterr().out
  assert not (tmp_path / 'run' / 'metrics.json').exists()  # (The chief's to write.)


def test_callback_state_follows_keras_semantics():
  state = loop.CallbackState()
  lr = 1e-3
  trace = []
  for epoch, auc in enumerate([0.80, 0.85, 0.84, 0.83, 0.86, 0.85, 0.85, 0.85], start=1):
    improved, lr = state.update(epoch, auc, early_stopping_patience=3, reduce_lr_patience=2,
                                lr=lr)
    trace.append((improved, lr, state.stopped_early))
    if state.stopped_early:
      break
  assert [t[0] for t in trace] == [True, True, False, False, True, False, False, False]
  assert [t[1] for t in trace] == [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 2.5e-4, 2.5e-4]
  assert trace[-1][2] and state.best_epoch == 5 and state.best == 0.86


@pytest.mark.parametrize('flags, message', [
    (['--model=resnet'], 'model'),  # absl's own check.
    (['--profile_steps=5'], '--profile_steps=5: expected START,STOP'),  # Parsing the flags.
    (['--epochs=0'], '--epochs=0: must be >= 1'),  # train.check_config.
    (['--stain_jitter_on=gpu'], 'stain_jitter_on'),
    (['--augment_on=gpu'], 'augment_on'),
])
def test_bad_flags_fail_with_one_line(records, tmp_path, flags, message):
  """Through the CLI, as a user runs it: every kind of flag error is one line, before TF starts.

  (The errors found once TensorFlow runs are in test_cli.py.)
  """
  proc = run_tool('-m', 'pcam_tfdata.train', f'--records_dir={records}',
                  f'--model_dir={tmp_path / "r"}', *flags)
  assert proc.returncode != 0
  errors = error_lines(proc.stderr)
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert not (tmp_path / 'r').exists()


@pytest.mark.parametrize('setting, message', [
    (dict(epochs=0), '--epochs=0: must be >= 1'),
    (dict(batch_size=0), '--batch_size=0: must be >= 1'),
    (dict(learning_rate=0), '--learning_rate=0: must be > 0'),
    (dict(seed=-1), '--seed=-1: must be in 0..4294967295'),
    (dict(seed=2**32), '--seed=4294967296: must be in 0..4294967295'),
    (dict(stain_jitter=1.5), '--stain_jitter=1.5: must be in [0, 1)'),
    (dict(sync_batch_norm='maybe'), '--sync_batch_norm=maybe: choose one of auto, on, off'),
    (dict(augment_cache_gib=-1.0), '--augment_cache_gib=-1.0: must be a number of GiB'),
    (dict(augment_cache_gib=float('inf')), '--augment_cache_gib=inf: must be a number of GiB'),
    (dict(augment_cache_gib=float('nan')), '--augment_cache_gib=nan: must be a number of GiB'),
    (dict(stain_jitter_on='gpu'), '--stain_jitter_on=gpu: choose one of auto, host, device'),
    (dict(augment_on='tpu'), '--augment_on=tpu: choose one of auto, host, device'),
    (dict(jit_compile='yes'), '--jit_compile=yes: choose one of auto, on, off'),
    (dict(steps_per_execution=0), '--steps_per_execution=0: must be >= 1'),
    (dict(early_stopping_patience=0), '--early_stopping_patience=0: must be >= 1'),
    (dict(reduce_lr_patience=0), '--reduce_lr_patience=0: must be >= 1'),
    (dict(num_cpu_devices=0), '--num_cpu_devices=0: must be >= 1'),
    (dict(data_service_address='host:5050'), 'expected grpc://host:port'),
    (dict(data_service_address='grpc://h:1', augment=True, augment_on='device'),
     '--augment_on=device: with --data_service_address the tf.data service workers augment'),
    (dict(data_service_address='grpc://h:1', stain_jitter=0.1, stain_jitter_on='device'),
     '--stain_jitter_on=device: with --data_service_address the tf.data service workers'),
    (dict(weights='imagenet'), '--weights=imagenet: only the Keras applications'),
    (dict(model='resnet50v2', weights='random'), '--weights=random: choose one of none, imagenet'),
])
def test_bad_settings_are_refused_naming_the_flag_before_anything_is_written(
    records, tmp_path, setting, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    train.run(_config(records, tmp_path / 'run', **setting))
  assert not (tmp_path / 'run').exists()


def test_a_malformed_tf_config_is_named(monkeypatch):
  monkeypatch.setenv('TF_CONFIG', '{"cluster": ')
  with pytest.raises(ValueError, match='TF_CONFIG: not valid JSON'):
    distribute.make_strategy('multi_worker')


def test_report_prints_the_seed_table(tmp_path):
  for name, auc in (('baseline', 0.9271), ('batchnorm', 0.9537)):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'metrics.json').write_text(json.dumps({
        'model': name, 'train_accuracy': 0.9, 'train_auc': 0.95, 'val_accuracy': 0.85,
        'val_auc': auc, 'best_epoch': 3, 'precision_policy': 'float32',
        'num_replicas_in_sync': 1}))
  text = report.table([str(tmp_path / 'baseline'), str(tmp_path / 'batchnorm')])
  assert '| Baseline | 0.9000 | 0.9500 | 0.8500 | 0.9271 |' in text
  assert '| BatchNorm | 0.9000 | 0.9500 | 0.8500 | 0.9537 |' in text
  with pytest.raises(ValueError, match='no finished run'):
    report.table([str(tmp_path / 'absent')])


@pytest.mark.parametrize('mode, policy', [('float16', 'mixed_float16'),
                                          ('bfloat16', 'mixed_bfloat16')])
def test_mixed_precision_run_trains_with_finite_loss(records, tmp_path, mode, policy):
  metrics = train.run(_config(records, tmp_path / 'run', mixed_precision=mode))
  assert metrics['precision_policy'] == policy
  with open(tmp_path / 'run' / 'history.csv') as f:
    row = next(csv.DictReader(f))
  assert np.isfinite(float(row['train_loss'])) and np.isfinite(float(row['val_loss']))
  model = keras.models.load_model(tmp_path / 'run' / 'model.keras')
  assert model.get_layer('block1_conv').compute_dtype == policy.split('_')[1]
  assert model.get_layer('probability').compute_dtype == 'float32'


@pytest.mark.parametrize('damage, split', [(flip_a_byte, 'train'),
                                           (cut_after_first_record, 'train'),
                                           (cut_after_first_record, 'val')])
def test_a_damaged_shard_is_named_not_trained_on(records, tmp_path, damage, split):
  """TensorFlow's error names no file (and a cut at a record boundary raises none of its
  own): the run stops with one error naming the shard, not metrics of fewer examples.
  (Through the CLI such an error is one line: test_cli.py.)"""
  copy, shard = damage(records, tmp_path, split)
  with pytest.raises(verify.CorruptShardError) as e:
    train.run(_config(copy, tmp_path / 'run'))
  assert str(e.value).startswith(f'{shard}: corrupt or truncated shard (')
  assert str(e.value).endswith(f'check the folder with tools/verify_records.py {copy}')
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'run' / 'metrics.json').exists()


def test_a_damaged_backup_is_named_not_blamed_on_the_records(records, tmp_path, monkeypatch):
  model_dir = tmp_path / 'run'
  train.run(_config(records, model_dir, epochs=1))  # (Its backup stays.)
  data = next((model_dir / 'backup').glob('ckpt-*.data-*'))
  damaged = bytearray(data.read_bytes())
  damaged[len(damaged) // 2] ^= 0xFF
  data.write_bytes(bytes(damaged))
  (model_dir / 'metrics.json').unlink()
  with pytest.raises(ValueError, match='backup of an interrupted run cannot be restored') as e:
    train.run(_config(records, model_dir, epochs=2))
  assert 'verify_records' not in str(e.value) and str(model_dir / 'backup') in str(e.value)


_KILL_BEFORE_THE_BEST_MODEL_IS_COMMITTED = '''
import os, signal, sys
import importlib
from pcam_tfdata import rundir
train = importlib.import_module('pcam_tfdata.train')
real = rundir.commit_best
def die_at_epoch_1(model_dir, epoch):
  if epoch == 1:  # The first epoch always improves: its best model is pending.
    os.kill(os.getpid(), signal.SIGKILL)
  real(model_dir, epoch)
rundir.commit_best = die_at_epoch_1
train.run(train.Config(records_dir=sys.argv[1], model_dir=sys.argv[2], epochs=3, batch_size=8,
                       eval_batch_size=16, mixed_precision='off', strategy='default', seed=1,
                       early_stopping_patience=5))
'''


@pytest.mark.slow  # (8 s; to keep the default tier within 4 minutes from a fresh clone)
def test_the_best_model_and_the_backup_agree_after_a_kill_between_them(records, tmp_path):
  model_dir = tmp_path / 'run'
  proc = subprocess.run([sys.executable, '-c', _KILL_BEFORE_THE_BEST_MODEL_IS_COMMITTED,
                         str(records), str(model_dir)], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, env=dict(os.environ))
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert (model_dir / '.best-epoch1.keras').exists() and not (model_dir / 'model.keras').exists()
  with open(model_dir / 'history.csv') as f:
    rows = list(csv.DictReader(f))
  # Epoch 1 was backed up, so the restart must commit epoch 1's model, not lose it.
  train.run(_config(records, model_dir, epochs=1, early_stopping_patience=5))
  assert not list(model_dir.glob('.best-epoch*'))
  metrics = json.loads((model_dir / 'metrics.json').read_text())
  assert metrics['best_epoch'] == 1 and metrics['epochs_run'] == 1
  model = keras.models.load_model(model_dir / 'model.keras')
  from pcam_tfdata.training import evaluate  # pylint: disable=g-import-not-at-top
  ds = pipeline.make_dataset(str(records), 'val', batch_size=16, training=False, with_ids=True)
  probs, labels, _ = evaluate.predict(evaluate.make_predict_fn(model), ds)
  assert evaluate.binary_metrics(labels, probs)['auc'] == pytest.approx(
      float(rows[0]['val_auc']), abs=1e-6)


# Sends the signal argv[1] to itself before the compiled call argv[2]; a
# SIGTERM is then seen by TensorFlow's handler before that call ends, so the
# run stops (at the next point where it checks) at the same step every time.
_SIGNAL_AT_STEP = r'''
import importlib, os, signal, sys, time
from absl import app
from pcam_tfdata import cli
cli.import_tensorflow()  # As the command does: its stderr is the user's.
train = importlib.import_module('pcam_tfdata.train')  # The command's module.
from pcam_tfdata.training import loop, preemption
sig, at = getattr(signal, sys.argv[1]), int(sys.argv[2])
watches = []
real_init = preemption.Watch.__init__
def keep(self, *args):
  real_init(self, *args)
  watches.append(self)
preemption.Watch.__init__ = keep
make_train_fn = loop.make_train_fn
def signalling_train_fn(*args, **kwargs):
  train_steps = make_train_fn(*args, **kwargs)
  calls = [0]
  def wrapped(iterator, n):
    calls[0] += 1
    if calls[0] == at:
      os.kill(os.getpid(), sig)  # SIGKILL: mid-epoch, as a power cut would.
      deadline = time.monotonic() + 60
      while not watches[0]._handler._received_own_sigterm.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return train_steps(iterator, n)
  return wrapped
loop.make_train_fn = signalling_train_fn
sys.argv = ['train'] + sys.argv[3:]
app.run(train.main)
'''


def _final_digest(stdout):
  return re.findall(r'final weights sha256 (\w+)', stdout)


def _saved_weights(model_dir):
  return keras.models.load_model(model_dir / 'model.keras').get_weights()


def _history(model_dir):
  with open(model_dir / 'history.csv') as f:
    return [(r['epoch'], r['train_loss'], r['val_auc']) for r in csv.DictReader(f)]


# default: 6 steps of 8 per epoch, 3 epochs; SIGKILL in call 9, step 3 of
# epoch 2, after --backup_every_steps=2's backup at its step 2 (epoch 3 then
# starts at its step 0 again). mirrored: 48 examples
# in per-replica batches of 9 are 5 batches, of which each epoch's 2 steps of
# 18 take 4: the fifth must not open the next epoch. SIGTERM in call 2 (the
# last of epoch 1) is acted on at the next check, after call 3: a backup at
# epoch 2, step 1, then exit. efficientnetv2b0: as default over 2 epochs (its
# BatchNorm, its own dropout and stochastic depth), the killed run augmenting
# on the host, the whole one and the resumed one in the step (--augment_on).
@pytest.mark.slow
@pytest.mark.parametrize('strategy, epochs, batch_size, sig, at, flag, stopped, resumed_at, model', [
    ('default', 3, 8, 'SIGKILL', 9, '--backup_every_steps=2', -signal.SIGKILL,
     'resuming epoch 2 at step 2', 'baseline'),
    ('mirrored', 2, 18, 'SIGTERM', 2, '--backup_every_steps=0', 42,
     'resuming epoch 2 at step 1', 'baseline'),
    ('default', 2, 8, 'SIGKILL', 9, '--backup_every_steps=2', -signal.SIGKILL,
     'resuming epoch 2 at step 2', 'efficientnetv2b0')])
def test_a_seeded_run_stopped_mid_epoch_ends_bit_identical_to_an_uninterrupted_one(
    records, tmp_path, strategy, epochs, batch_size, sig, at, flag, stopped, resumed_at, model,
    capsys, request):
  """One run whole; the same command killed (or preempted) in epoch 2, then run again.

  The resumed run starts mid-epoch and ends with the uninterrupted run's
  weights, bit for bit (the last epoch's and the best epoch's), and its
  history: epoch 2 came from two processes, so this also shows that a rerun agrees.
  """
  dist = request.getfixturevalue('mirrored') if strategy == 'mirrored' else None
  application = model != 'baseline'
  settings = dict(epochs=epochs, batch_size=batch_size, seed=5, augment=True,
                  early_stopping_patience=5, progress=False, strategy=strategy,
                  eval_batch_size=512, model=model,
                  augment_on='device' if application else 'auto')  # As the CLI.
  train.run(_config(records, tmp_path / 'whole', **settings), strategy=dist)
  whole = capsys.readouterr().out
  killed_dir = tmp_path / 'killed'
  # In a process of its own, set up as this one (two logical CPUs, this
  # environment: the same kernels).
  flags = [f'--epochs={epochs}', f'--batch_size={batch_size}', '--mixed_precision=off', '--seed=5',
           '--augment', '--noprogress', f'--records_dir={records}',
           '--early_stopping_patience=5', f'--strategy={strategy}', '--num_cpu_devices=2', flag,
           f'--model={model}', '--augment_on=host']
  killed = subprocess.run([sys.executable, '-c', _SIGNAL_AT_STEP, sig, str(at),
                           f'--model_dir={killed_dir}', *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ))
  assert killed.returncode == stopped, killed.stderr[-3000:]
  if sig == 'SIGTERM':
    assert killed.stderr.splitlines() == ['train: preempted at epoch 2, step 1: backup saved; '
                                          'rerun the same command to resume'], killed.stderr
  assert not (killed_dir / 'metrics.json').exists()
  train.run(_config(records, killed_dir, **settings), strategy=dist)
  resumed = capsys.readouterr().out
  assert resumed_at in resumed
  assert _final_digest(resumed) == _final_digest(whole) and len(_final_digest(whole)) == 1
  for a, b in zip(_saved_weights(killed_dir), _saved_weights(tmp_path / 'whole')):
    np.testing.assert_array_equal(a, b)
  assert _history(killed_dir) == _history(tmp_path / 'whole')


def test_every_flag_reaches_the_runs_config():
  """Each Config field is a flag of the same name (but the Python API's eval_batch_size), and
  a value other than its default set on the command line is what the run gets (a flag parsed
  but not passed on fails here)."""
  fields = [f.name for f in dataclasses.fields(train.Config) if f.name != 'eval_batch_size']
  argv = ['train']
  expected = {}
  for name in fields:
    flag = flags.FLAGS[name]
    if name == 'profile_steps':
      argv.append('--profile_steps=2,3')
      expected[name] = (2, 3)
      continue
    if isinstance(flag, flags.BooleanFlag) or isinstance(flag.default, bool):
      value = not flag.default
      argv.append(f'--{name}' if value else f'--no{name}')
    elif getattr(flag.parser, 'enum_values', None):
      value = next(v for v in flag.parser.enum_values if v != flag.default)
      argv.append(f'--{name}={value}')
    elif isinstance(flag.default, float):
      value = flag.default + 0.25
      argv.append(f'--{name}={value}')
    elif isinstance(flag.default, int) or name == 'seed':
      value = (flag.default or 0) + 3
      argv.append(f'--{name}={value}')
    elif name == 'dropout':  # A float without a default (the seed's per model).
      value = 0.25
      argv.append(f'--{name}={value}')
    else:
      value = f'/tmp/{name}'
      argv.append(f'--{name}={value}')
    expected[name] = value
  flags.FLAGS(argv)
  try:
    config = train._config_from_flags()  # pylint: disable=protected-access
  finally:
    flags.FLAGS.unparse_flags()
  assert {name: getattr(config, name) for name in fields} == expected


def test_a_training_run_reads_its_manifest_once(records, tmp_path, monkeypatch):
  """Through the CLI's main, which opens the folder before TensorFlow starts, then trains."""
  reads = []
  real_open = builtins.open

  def counting_open(file, *args, **kwargs):
    if os.path.basename(str(file)) == 'manifest.json':
      reads.append(file)
    return real_open(file, *args, **kwargs)

  monkeypatch.setattr(builtins, 'open', counting_open)
  flags.FLAGS(['train', f'--records_dir={records}', f'--model_dir={tmp_path / "cli"}',
               '--epochs=1', '--batch_size=8', '--mixed_precision=off', '--strategy=default',
               '--noprogress'])
  try:
    train.main(['train'])
  finally:
    flags.FLAGS.unparse_flags()
  assert len(reads) == 1 and (tmp_path / 'cli' / 'metrics.json').is_file()


@pytest.mark.slow  # 13 s; each setting's refusal stays in the default tier (below).
def test_a_resume_with_other_settings_is_refused_naming_them_and_restart_starts_afresh(
    records, kaggle_dir, tmp_path, monkeypatch, capsys):
  model_dir = tmp_path / 'run'
  train.run(_config(records, model_dir, epochs=1))  # Finished: its backup stays.
  before = {p: p.read_bytes() for p in model_dir.rglob('*') if p.is_file()}
  other = tmp_path / 'other'  # Records of the same shape, other examples (a second fold).
  run_convert(kaggle_dir, other, per_class=20)
  for setting, named in (({'batch_size': 16}, '--batch_size: 8 then, 16 now'),
                         ({'augment': True, 'seed': 2},
                          '--seed: 1 then, 2 now; --augment: False then, True now'),
                         ({'records': other}, f'--records_dir: {records} then, {other} '
                                              '(other records) now')):
    records_dir = setting.pop('records', records)
    with pytest.raises(ValueError) as e:
      train.run(_config(records_dir, model_dir, epochs=2, **setting))
    assert str(e.value).startswith(f'{model_dir / "backup"}: the backup is of a run with other '
                                   'settings (') and named in str(e.value), str(e.value)
    assert str(e.value).endswith('or add --restart to train from scratch')
    assert {p: p.read_bytes() for p in model_dir.rglob('*') if p.is_file()} == before
  # The same settings continue the finished run: --epochs may grow (and it
  # says so), --sync_batch_norm does not matter to a model without BatchNorm,
  # and the same records may have moved (a copy elsewhere: the same fingerprint).
  moved = tmp_path / 'moved' / 'rec'
  shutil.copytree(records, moved)
  train.run(_config(moved, model_dir, epochs=2, sync_batch_norm='on'))  # (No BatchNorm.)
  out = capsys.readouterr().out
  assert 'resuming after epoch 1' in out
  assert 'continuing with --epochs=2 (the run was started with --epochs=1)' in out
  # Not below the epochs trained. (The same command again evaluates, trains
  # nothing: test_a_signal_after_the_last_step_stops_the_chief...)
  with pytest.raises(ValueError, match=r'\(--epochs: 2 then, 1 now, fewer than the 2 trained\)'):
    train.run(_config(records, model_dir, epochs=1))
  with open(model_dir / 'history.csv') as f:
    assert [r['epoch'] for r in csv.DictReader(f)] == ['1', '2']
  # --restart discards the backup and trains afresh, whatever the settings.
  old_curves = set((model_dir / 'tensorboard').rglob('*'))
  train.run(_config(records, model_dir, epochs=1, batch_size=16, restart=True))
  out = capsys.readouterr().out
  assert not old_curves & set((model_dir / 'tensorboard').rglob('*'))
  assert f'--restart: discarding the backup in {model_dir / "backup"}' in out
  assert 'resuming' not in out
  with open(model_dir / 'history.csv') as f:
    assert [r['epoch'] for r in csv.DictReader(f)] == ['1']
  assert json.loads((model_dir / 'metrics.json').read_text())['global_batch_size'] == 16


class _Killed(BaseException):
  """A kill mid-epoch: nothing of the run's own handles it (as nothing handles SIGKILL)."""


def _stopping_at_call(monkeypatch, at, how):
  """From the run's `at`-th compiled call on: 'kill' raises _Killed before it; 'sigterm' sends
  SIGTERM to this process before it (TensorFlow's handler notes it; the run backs up after the
  call and raises Preempted)."""
  watches, real_init, make_train_fn = [], preemption.Watch.__init__, loop.make_train_fn

  def keep(self, *args):
    real_init(self, *args)
    watches.append(self)

  def stopping_train_fn(*args, **kwargs):
    train_steps, calls = make_train_fn(*args, **kwargs), [0]

    def steps(iterator, n):
      calls[0] += 1
      if calls[0] == at:
        if how == 'kill':
          raise _Killed()
        os.kill(os.getpid(), signal.SIGTERM)
        while not watches[-1].signalled:  # (Python runs the handler between bytecodes.)
          pass
      return train_steps(iterator, n)
    return steps

  monkeypatch.setattr(preemption.Watch, '__init__', keep)
  monkeypatch.setattr(loop, 'make_train_fn', stopping_train_fn)


# 6 steps of 8 an epoch, 3 epochs; the 9th call is epoch 2's step 3. Killed
# there, the backup of --backup_every_steps=2 at its step 2 is resumed (step
# 3 trained again); signalled there, TensorFlow's handler saves at the next
# check after the one it was signalled before (as in the slow tier): after
# step 4, the only backup within the epoch (--backup_every_steps=0).
# The kill case also trains with every optimisation flag a search draws: a
# schedule of the step counter (warm-up, then one cycle), AdamW, label
# smoothing and another dropout must resume on the same curve.
_SEARCHED = dict(lr_schedule='onecycle', warmup_epochs=0.5, weight_decay=1e-3,
                 label_smoothing=0.1, dropout=0.3)


@pytest.mark.parametrize('how, every, exits, resumed_at, extra', [
    ('kill', 2, _Killed, 'resuming epoch 2 at step 2', _SEARCHED),
    ('sigterm', 0, preemption.Preempted, 'resuming epoch 2 at step 4', {})])
def test_a_baseline_run_stopped_mid_epoch_resumes_bit_identical(
    records, tmp_path, monkeypatch, capsys, how, every, exits, resumed_at, extra):
  """The default tier's resume check (the slow tier kills real processes, and more models).

  Adam's moments, the dropout layer's random state, the step position, the epoch's running
  sums and the backup's timing each decide the last weights or the history.
  """
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers are the main thread\'s')
  settings = dict(epochs=3, seed=5, augment=True, stain_jitter=0.05, backup_every_steps=every,
                  early_stopping_patience=5, progress=False, **extra)
  train.run(_config(records, tmp_path / 'whole', **settings))
  whole = capsys.readouterr().out
  with monkeypatch.context() as patches:
    _stopping_at_call(patches, 9, how)
    with pytest.raises(exits):
      train.run(_config(records, tmp_path / 'stopped', **settings))
  assert not (tmp_path / 'stopped' / 'metrics.json').exists()
  assert [row[0] for row in _history(tmp_path / 'stopped')] == ['1']
  capsys.readouterr()
  train.run(_config(records, tmp_path / 'stopped', **settings))
  resumed = capsys.readouterr().out
  assert resumed_at in resumed, resumed
  assert _final_digest(resumed) == _final_digest(whole) and len(_final_digest(whole)) == 1
  for a, b in zip(_saved_weights(tmp_path / 'stopped'), _saved_weights(tmp_path / 'whole')):
    np.testing.assert_array_equal(a, b)  # The best epoch's model, too.

  def rows(model_dir):  # All but the timings.
    with open(model_dir / 'history.csv') as f:
      return [{k: v for k, v in r.items() if k not in ('seconds', 'images_per_second')}
              for r in csv.DictReader(f)]
  assert rows(tmp_path / 'stopped') == rows(tmp_path / 'whole')
  assert len(rows(tmp_path / 'whole')) == 3


class _Setup(types.SimpleNamespace):
  """What resume.settings reads of trainer.Setup."""


# Every setting a resume checks: changed alone, and how the refusal names it.
_CHECKED = [
    ('records', '--records_dir'), ('model', '--model'), ('weights', '--weights'),
    ('batch_size', '--batch_size'), ('steps_per_epoch', '--steps_per_epoch'),
    ('learning_rate', '--learning_rate'), ('seed', '--seed'),
    ('dropout', '--dropout'), ('weight_decay', '--weight_decay'),
    ('label_smoothing', '--label_smoothing'), ('lr_schedule', '--lr_schedule'),
    ('warmup_epochs', '--warmup_epochs'), ('augment', '--augment'), ('stain_jitter', '--stain_jitter'),
    ('stain_jitter_on', '--stain_jitter_on'), ('precision', '--mixed_precision'),
    ('sync_batch_norm', '--sync_batch_norm'), ('input_order', '--input_order'),
    ('replicas', 'the replicas in sync'), ('input_pipelines', 'the input pipelines')]


@pytest.mark.parametrize('setting, named', _CHECKED)
def test_every_checked_setting_changed_alone_is_refused_naming_it(setting, named):
  """Through resume.settings (what a backup records, as JSON) and resume.check."""
  def settings(fingerprint='abc', setup=(), **config):
    base = dict(model='batchnorm', batch_size=8, learning_rate=1e-3, seed=1, augment=False,
                stain_jitter=0.1, sync_batch_norm='auto', epochs=2)
    config = train.Config(records_dir='/r', model_dir='/m', **{**base, **config})
    records = types.SimpleNamespace(path='/r', manifest={'fingerprint': fingerprint})
    # (The per-pipeline order: the topology is checked too.)
    setup = _Setup(**{**dict(stain_on_device=False, policy='float32', sync_batch_norm=False,
                             replicas=2, pipelines=2, order='per_pipeline'), **dict(setup)})
    return resume.settings(config, records, setup)

  changed = {
      'records': dict(fingerprint='def'), 'model': dict(model='efficientnetv2b0'),
      'weights': dict(weights='imagenet'), 'batch_size': dict(batch_size=16),
      'steps_per_epoch': dict(steps_per_epoch=5),
      'learning_rate': dict(learning_rate=1e-4), 'seed': dict(seed=2),
      'dropout': dict(dropout=0.3), 'weight_decay': dict(weight_decay=1e-4),
      'label_smoothing': dict(label_smoothing=0.1), 'lr_schedule': dict(lr_schedule='onecycle'),
      'warmup_epochs': dict(warmup_epochs=0.5), 'augment': dict(augment=True), 'stain_jitter': dict(stain_jitter=0.2),
      'stain_jitter_on': dict(setup={'stain_on_device': True}),
      'precision': dict(setup={'policy': 'mixed_float16'}),
      'sync_batch_norm': dict(setup={'sync_batch_norm': True}),
      'input_order': dict(setup={'order': 'global'}),
      'replicas': dict(setup={'replicas': 4}), 'input_pipelines': dict(setup={'pipelines': 4}),
  }[setting]
  saved = json.loads(json.dumps(settings()))  # As the backup holds it.
  resume.check(saved, settings(), 'backup')  # The same: resumed.
  with pytest.raises(ValueError) as e:
    resume.check(saved, settings(**changed), 'backup')
  differ = re.fullmatch(r'backup: the backup is of a run with other settings \((.*)\); rerun '
                        r'the command .*', str(e.value))[1].split('; ')
  assert len(differ) == 1 and named in differ[0], differ


def _resume_settings(model='baseline', **setup):
  config = train.Config(records_dir='/r', model_dir='/m', model=model, seed=1, epochs=2)
  records = types.SimpleNamespace(path='/r', manifest={'fingerprint': 'abc'})
  setup = _Setup(**{**dict(stain_on_device=False, policy='float32', sync_batch_norm=False,
                           replicas=1, pipelines=1, order='global'), **setup})
  return json.loads(json.dumps(resume.settings(config, records, setup)))


@pytest.mark.parametrize('then, now, line', [
    (dict(replicas=4, pipelines=4), dict(replicas=2, pipelines=2),
     'resuming on 2 workers (the run began on 4 workers): the same batches; float sums may '
     'round differently'),
    (dict(replicas=1, pipelines=1), dict(replicas=4, pipelines=2),
     'resuming on 2 workers with 4 replicas (the run began on 1 worker)'),
    (dict(replicas=8, pipelines=1), dict(replicas=4, pipelines=1),
     'resuming on 1 worker with 4 replicas (the run began on 1 worker with 8 replicas)'),
])
def test_the_global_order_resumes_on_another_topology_saying_so(then, now, line):
  lines = []
  resume.check(_resume_settings(**then), _resume_settings(**now), 'backup', log=lines.append)
  assert len(lines) == 1 and lines[0].startswith(line), lines
  lines.clear()
  resume.check(_resume_settings(**now), _resume_settings(**now), 'backup', log=lines.append)
  assert lines == []  # The same topology: nothing to say.


def test_a_topology_change_is_refused_where_the_batches_or_moments_would_change():
  # Each worker its own shards: other batches on another number of workers.
  per = dict(order='per_pipeline', replicas=2, pipelines=2)
  with pytest.raises(ValueError, match=r'the input pipelines \(the workers\): 2 then, 3 now'):
    resume.check(_resume_settings(**per), _resume_settings(**{**per, 'pipelines': 3,
                                                               'replicas': 3}), 'backup')
  # A backup from before the order was recorded: one pipeline's order was global, several's not.
  old = _resume_settings(replicas=2, pipelines=2)
  del old['input_order']
  with pytest.raises(ValueError, match=r'--input_order\): per_pipeline then, global now; add '
                                       r'--input_order=per_pipeline to resume it\)'):
    resume.check(old, _resume_settings(replicas=2, pipelines=2), 'backup')
  said = []
  resume.check(old, _resume_settings(replicas=2, pipelines=2, order='per_pipeline'), 'backup',
               log=said.append)  # Its masks were each replica's own: said, once.
  assert said == ['the backup predates dropout masks drawn for the global batch: from here on '
                  "this run's masks differ from those an uninterrupted run would have drawn "
                  '(alike in distribution)']
  del old['input_pipelines'], old['replicas']  # Older still: one pipeline, accepted.
  resume.check(old, _resume_settings(), 'backup', log=said.append)
  assert len(said) == 1
  # BatchNorm synchronized over 2 replicas, then one replica: the global batch's moments.
  sync = dict(model='batchnorm', replicas=2, pipelines=1, sync_batch_norm=True)
  resume.check(_resume_settings(**sync), _resume_settings(model='batchnorm'), 'backup',
               log=lambda _: None)
  # Another model, with BatchNorm where there was none: both named, no crash.
  with pytest.raises(ValueError, match=r'--model: baseline then, batchnorm now; '
                                       r'--sync_batch_norm: None then, True now'):
    resume.check(_resume_settings(), _resume_settings(**sync), 'backup')
  # Unsynchronized over 2 replicas, each half-batch's moments: not one replica's.
  with pytest.raises(ValueError, match=r"BatchNorm's moments \(--sync_batch_norm\): each of 2 "
                                       r"replicas' own \(not synchronized\) then, the global "
                                       r"batch's now"):
    resume.check(_resume_settings(**{**sync, 'sync_batch_norm': False}),
                 _resume_settings(model='batchnorm'), 'backup')


@pytest.mark.parametrize('epochs, stopped, runs', [(2, False, 2), (3, True, 2)])
def test_stopped_early_only_when_early_stopping_ended_the_run_before_its_last_epoch(
    records, tmp_path, monkeypatch, capsys, epochs, stopped, runs):
  """Val AUC flat from epoch 1 on, patience 1: out of patience after epoch 2, which is the
  last of 2 (trained all: not stopped early) or not of 3 (stopped early)."""
  monkeypatch.setattr(epochs_lib.evaluate, 'binary_metrics',
                      lambda labels, probs: {'auc': 0.5, 'loss': 0.7, 'accuracy': 0.5})
  metrics = train.run(_config(records, tmp_path / 'run', epochs=epochs,
                              early_stopping_patience=1, reduce_lr_patience=5))
  assert metrics['stopped_early'] is stopped and metrics['epochs_run'] == runs
  out = capsys.readouterr().out
  assert ('early stopping: val AUC best at epoch 1' in out) is stopped
  train.run(_config(records, tmp_path / 'run', epochs=epochs, early_stopping_patience=1,
                    reduce_lr_patience=5))  # Again: evaluated, said why it has finished.
  assert (f'has finished (early stopping after epoch 2)' if stopped else
          'has finished (all 2 epochs)') in capsys.readouterr().out


def test_steps_per_epoch_caps_each_epoch_with_the_epochs_own_first_batches(records, tmp_path,
                                                                          monkeypatch):
  """2 of the 6 steps an epoch, over 2 epochs: 4 steps (one per compiled call)."""
  calls, make_train_fn = [], loop.make_train_fn

  def counting(*args, **kwargs):
    train_steps = make_train_fn(*args, **kwargs)

    def steps(iterator, n):
      calls.append(int(n))
      return train_steps(iterator, n)
    return steps

  monkeypatch.setattr(loop, 'make_train_fn', counting)
  metrics = pcam_tfdata.train(str(records), str(tmp_path / 'run'), epochs=2, batch_size=8,
                              eval_batch_size=16, mixed_precision='off', strategy='default',
                              seed=1, steps_per_epoch=2, progress=False)
  assert calls == [1, 1, 1, 1] and metrics['epochs_run'] == 2
  with pytest.raises(ValueError, match=r'^--steps_per_epoch=-1: must be >= 0'):
    pcam_tfdata.train(str(records), str(tmp_path / 'bad'), steps_per_epoch=-1)
  calls.clear()  # A cap above the split's steps is the split's.
  pcam_tfdata.train(str(records), str(tmp_path / 'all'), epochs=1, batch_size=8,
                    eval_batch_size=16, mixed_precision='off', strategy='default', seed=1,
                    steps_per_epoch=100, progress=False)
  assert calls == [1] * 6
