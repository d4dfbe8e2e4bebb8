"""The tf.data pipeline: epochs, sharding, evaluation order, augmentation, pixels."""

import collections
import logging

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from pcam_tfdata.convert import tiff
from pcam_tfdata import records as records_lib
from pcam_tfdata import schema
from pcam_tfdata.training import augment
from pcam_tfdata.training import input_order
from pcam_tfdata.training import pipeline
from pcam_tfdata.training import split_cache
from conftest import run_convert, synthetic_records


@pytest.fixture(scope='module')
def truth(kaggle_dir):
  frame = pd.read_csv(kaggle_dir / 'train_labels.csv', dtype={'id': str})
  return dict(zip(frame['id'], frame['label']))


def _ids(batches):
  return [i.decode() for b in batches for i in b[2].numpy()]


def _epoch(ds):
  return [tuple(t for t in b) for b in ds]


def _crop(kaggle_dir, example_id):
  return tiff.read_patch(str(kaggle_dir / 'train' / f'{example_id}.tif'))[32:64, 32:64]


def test_training_epoch_is_the_split_minus_the_remainder(records, truth):
  split = {i for i in truth}  # Labels of every id; the split is a subset.
  count = records_lib.Records.open(records).count('train')
  ds = pipeline.make_dataset(str(records), 'train', batch_size=10, training=True, with_ids=True)
  first, second = _epoch(ds), _epoch(ds)
  for batches in (first, second):
    assert len(batches) == count // 10
    ids = _ids(batches)
    assert len(ids) == len(set(ids)) == count // 10 * 10
    assert set(ids) <= split
    labels = [l for b in batches for l in b[1].numpy()]
    assert labels == [truth[i] for i in ids]
    assert batches[0][0].shape == (10, 32, 32, 3) and batches[0][0].dtype == tf.uint8
    assert batches[0][1].dtype == tf.float32
  assert _ids(first) != _ids(second)  # A new order each epoch.


def test_batch_of_one_covers_the_split_exactly(records):
  ds = pipeline.make_dataset(str(records), 'train', batch_size=1, training=True, with_ids=True)
  ids = _ids(_epoch(ds))
  assert len(ids) == records_lib.Records.open(records).count('train') == len(set(ids))


def test_seed_makes_order_and_augmentation_reproducible(records):
  make = lambda **kw: pipeline.make_dataset(str(records), 'train', batch_size=8, training=True,
                                            augment=True, seed=7, with_ids=True, **kw)
  a, b = make(num_epochs=2), make(num_epochs=2)
  a_epochs, b_epochs = _epoch(a), _epoch(b)
  assert len(a_epochs) == 2 * (48 // 8)
  assert _ids(a_epochs) == _ids(b_epochs)
  for x, y in zip(a_epochs, b_epochs):
    np.testing.assert_array_equal(x[0].numpy(), y[0].numpy())
  first, second = a_epochs[:6], a_epochs[6:]
  assert _ids(first) != _ids(second)  # A new order each epoch.
  # Epoch 2 depends on (seed, 2) alone: a pipeline that starts there (a
  # resumed run, in a new process) yields exactly what the first run did.
  resumed = _epoch(make(first_epoch=2))
  assert _ids(resumed) == _ids(second)
  for x, y in zip(resumed, second):
    np.testing.assert_array_equal(x[0].numpy(), y[0].numpy())
  other = pipeline.make_dataset(str(records), 'train', batch_size=8, training=True, seed=8,
                                with_ids=True)
  assert _ids(_epoch(other)) != _ids(first)


def test_each_iteration_of_a_seeded_dataset_is_the_next_epoch(records):
  """As tf.data's seeded shuffle: a reproducible sequence of different epochs (Keras `fit`)."""
  make = lambda **kw: pipeline.make_dataset(str(records), 'train', batch_size=8, training=True,
                                            augment=True, seed=5, with_ids=True, **kw)
  ds = make()
  iterations = [_epoch(ds) for _ in range(3)]
  orders = [_ids(it) for it in iterations]
  assert len({tuple(o) for o in orders}) == 3  # Three different orders,
  images = [{i: img for b in it for i, img in zip(_ids([b]), b[0].numpy())} for it in iterations]
  common = set(images[0]) & set(images[1]) & set(images[2])
  redrawn = [i for i in common if not (np.array_equal(images[0][i], images[1][i]) and
                                       np.array_equal(images[1][i], images[2][i]))]
  assert len(redrawn) > len(common) / 2  # and new transforms for the same image.
  # A second dataset with the same arguments gives the same three,
  again = make()
  for k in range(3):
    assert _ids(_epoch(again)) == orders[k]
  # and iteration k is epoch 1 + k, as a pipeline that starts there yields it.
  for k in range(3):
    started = _epoch(make(first_epoch=1 + k))
    assert _ids(started) == orders[k]
    for x, y in zip(started, iterations[k]):
      np.testing.assert_array_equal(x[0].numpy(), y[0].numpy())
  # Several epochs an iteration: the next iteration goes on from the last one.
  two = make(num_epochs=2)
  assert _ids(_epoch(two)) == orders[0] + orders[1]
  assert _ids(_epoch(two)) == orders[2] + _ids(_epoch(make(first_epoch=4)))
  # Unseeded: a new order each iteration too.
  unseeded = pipeline.make_dataset(str(records), 'train', batch_size=8, training=True,
                                   with_ids=True)
  assert _ids(_epoch(unseeded)) != _ids(_epoch(unseeded))


def test_batches_per_epoch_ends_each_epoch_where_a_resumed_one_starts(records):
  make = lambda **kw: pipeline.make_dataset(str(records), 'train', batch_size=8, training=True,
                                            seed=2, with_ids=True, batches_per_epoch=4, **kw)
  both = _epoch(make(num_epochs=2))
  assert len(both) == 8  # 4 of the 6 whole batches, per epoch.
  assert _ids(both[4:]) == _ids(_epoch(make(first_epoch=2)))
  with pytest.raises(ValueError, match='batches_per_epoch=7: this input pipeline has 6 whole'):
    pipeline.make_dataset(str(records), 'train', batch_size=8, training=True,
                          batches_per_epoch=7)


def test_first_batch_starts_the_first_epoch_mid_way(records):
  """A run resumed at step 3 of epoch 2: the uninterrupted run's batches from there on."""
  options = augment.Augment(dihedral=True, stain_jitter=0.05)
  make = lambda **kw: pipeline.make_dataset(str(records), 'train', batch_size=8, training=True,
                                            augment=options, seed=4, with_ids=True,
                                            first_epoch=2, **kw)
  whole = _epoch(make(num_epochs=2))
  resumed = make(num_epochs=2, first_batch=3)
  assert resumed.cardinality() == 12 - 3
  resumed = _epoch(resumed)
  assert _ids(resumed) == _ids(whole[3:])
  for x, y in zip(resumed, whole[3:]):  # Images with their dihedral and stain draws.
    np.testing.assert_array_equal(x[0].numpy(), y[0].numpy())
  with pytest.raises(ValueError, match=r'first_batch=6: must be in 0\.\.5'):
    make(first_batch=6)


def test_endless_training_dataset_continues_the_epoch_sequence(records):
  endless = pipeline.make_dataset(str(records), 'train', batch_size=8, training=True, seed=3,
                                  with_ids=True, num_epochs=None)
  assert endless.cardinality() == tf.data.INFINITE_CARDINALITY
  three = pipeline.make_dataset(str(records), 'train', batch_size=8, training=True, seed=3,
                                with_ids=True, num_epochs=3)
  assert _ids(list(endless.take(18))) == _ids(_epoch(three))


@pytest.mark.parametrize('training, order', [(True, 'per_pipeline'), (True, 'global'),
                                              (False, 'auto')])
def test_two_input_pipelines_are_disjoint_and_cover_the_split(records, training, order):
  parts = []
  for pipeline_id in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                         num_replicas_in_sync=2)
    ds = pipeline.make_dataset(str(records), 'train', batch_size=1, training=training, seed=4,
                               input_context=context, with_ids=True, order=order)
    parts.append(set(_ids(_epoch(ds))))
  assert parts[0] and parts[1] and not parts[0] & parts[1]
  assert len(parts[0] | parts[1]) == records_lib.Records.open(records).count('train')


def _steps(records, batch_size, context=None, epochs=2, **kw):
  """Every batch of `epochs` seeded, augmented epochs: (ids, transform ids, stain maps) each."""
  augment_options = augment.Augment(dihedral=True, dihedral_on_device=True, stain_jitter=0.1,
                                    stain_on_device=True)
  ds = pipeline.make_dataset(str(records), 'train', batch_size=batch_size, training=True,
                             seed=11, augment=augment_options, input_context=context,
                             with_ids=True, num_epochs=epochs, **kw)
  return [(ids.numpy(), drawn['dihedral'].numpy(), drawn['stain'].numpy())
          for _, _, ids, drawn in ds]


def _joined(*batches):
  return tuple(np.concatenate(field) for field in zip(*batches))


@pytest.mark.parametrize('pipelines, replicas', [(2, 2), (1, 2), (2, 4), (4, 4)])
def test_the_global_order_serves_the_one_pipeline_global_batches_on_any_topology(
    records, pipelines, replicas):
  """The issue's bar, (2, 2): pipelines k = 0, 1 of batch 32 per replica each give, at every
  step, their half of the one-pipeline batch of 64: the same ids, in order, with the same
  augmentation draws. Replica r of the global batch takes its rows r*B...: pipeline k's
  replicas are k*R/P..., one yielded batch each per step."""
  per_replica = 24 // replicas  # (The fixture's 48 train examples: 2 steps of 24.)
  whole = _steps(records, 24)
  assert len(whole) == 4 and len(set(np.concatenate([w[0] for w in whole]))) == 48
  per_step = replicas // pipelines
  served = [_steps(records, per_replica, tf.distribute.InputContext(pipelines, k, replicas))
            for k in range(pipelines)]
  for k in range(pipelines):
    assert len(served[k]) == len(whole) * per_step
  for step, expected in enumerate(whole):
    got = _joined(*(served[k][step * per_step + j] for k in range(pipelines)
                    for j in range(per_step)))
    for field, want in zip(got, expected):
      np.testing.assert_array_equal(field, want, err_msg=f'step {step}')


def test_the_global_order_resumes_mid_epoch_on_another_topology(records):
  """Epoch 2 from its second step on 2 pipelines: the one-pipeline run's last batch."""
  whole = _steps(records, 24)
  halves = [_steps(records, 12, tf.distribute.InputContext(2, k, 2), first_epoch=2, epochs=1,
                   first_batch=1) for k in range(2)]
  assert len(halves[0]) == len(halves[1]) == 1
  for field, want in zip(_joined(halves[0][0], halves[1][0]), whole[3]):
    np.testing.assert_array_equal(field, want)


def test_a_resume_in_the_global_order_starts_on_a_global_step(records):
  """Two batches per step here (4 replicas on 2 pipelines): batch 1 would start mid-step."""
  context = tf.distribute.InputContext(2, 0, 4)
  with pytest.raises(ValueError, match=r'first_batch=1: must be in 0\.\.5, the batches of an '
                                       r'epoch, a multiple of 2'):
    pipeline.make_dataset(str(records), 'train', batch_size=4, training=True, seed=1,
                          input_context=context, first_batch=1)
  with pytest.raises(ValueError, match=r'batches_per_epoch=3: this input pipeline has 6 whole '
                                       r'batches of 4 per epoch, 2 per global step'):
    pipeline.make_dataset(str(records), 'train', batch_size=4, training=True, seed=1,
                          input_context=context, batches_per_epoch=3)


def test_the_global_order_over_several_pipelines_needs_one_seed(records):
  context = tf.distribute.InputContext(2, 0, 2)
  with pytest.raises(ValueError, match='seed=None with 2 input pipelines in the global order'):
    pipeline.make_dataset(str(records), 'train', batch_size=4, training=True,
                          input_context=context, order='global')
  with pytest.raises(ValueError, match=r"order='sorted': choose one of auto, global"):
    pipeline.make_dataset(str(records), 'train', batch_size=4, training=True, seed=1,
                          input_context=context, order='sorted')


def test_auto_takes_the_global_order_while_the_split_fits_a_quarter_of_memory(records,
                                                                            monkeypatch):
  opened = records_lib.Records.open(records)
  need = input_order.split_bytes(opened, 'train')
  assert need == 48 * 32 * 32 * 3
  monkeypatch.setattr(input_order, 'host_memory', lambda: 4 * need)
  assert input_order.choose_order('auto', opened, 'train', 2) == 'global'
  monkeypatch.setattr(input_order, 'host_memory', lambda: 4 * need - 1)
  assert input_order.choose_order('auto', opened, 'train', 2) == 'per_pipeline'
  assert input_order.choose_order('auto', opened, 'train', 1) == 'global'  # One reads them all.
  assert input_order.choose_order('global', opened, 'train', 2) == 'global'


def test_two_input_pipelines_with_one_seed_draw_their_own_augmentation(records):
  """Per-pipeline order: each pipeline's keys fold in its id: the same seed and epoch, other
  draws (not only other images); the same pipeline draws the same again."""
  augment_options = augment.Augment(dihedral=True, dihedral_on_device=True, stain_jitter=0.1,
                                    stain_on_device=True)

  def draws(pipeline_id):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                         num_replicas_in_sync=2)
    ds = pipeline.make_dataset(str(records), 'train', batch_size=4, training=True, seed=1,
                               augment=augment_options, input_context=context,
                               batches_per_epoch=4, order='per_pipeline')
    batches = [drawn for _, _, drawn in ds]
    return (np.concatenate([b['dihedral'].numpy() for b in batches]),
            np.concatenate([b['stain'].numpy() for b in batches]))

  (ids0, stain0), (ids1, stain1) = draws(0), draws(1)
  assert ids0.shape == ids1.shape == (16,) and stain0.shape == stain1.shape == (16, 4, 3)
  assert (ids0 != ids1).any() and not np.isclose(stain0, stain1).all(axis=(1, 2)).any()
  again = draws(0)
  np.testing.assert_array_equal(again[0], ids0)
  np.testing.assert_array_equal(again[1], stain0)


@pytest.mark.parametrize('training', [True, False])
def test_more_pipelines_than_shards_is_refused(records, training):
  """Where each pipeline reads its own shards: the per-pipeline order, and evaluation."""
  context = tf.distribute.InputContext(num_input_pipelines=5, input_pipeline_id=0)
  with pytest.raises(ValueError, match="split 'val' has 4 shards, fewer than 5 input pipelines"):
    pipeline.make_dataset(str(records), 'val', batch_size=1, training=training,
                          input_context=context, order='per_pipeline')


def test_evaluation_yields_each_id_once_in_a_fixed_order(records, kaggle_dir, truth):
  ds = pipeline.make_dataset(str(records), 'val', batch_size=5, training=False, with_ids=True)
  first, second = _epoch(ds), _epoch(ds)
  assert [len(b[2]) for b in first] == [5, 5, 2]  # The last partial batch is kept.
  ids = _ids(first)
  assert ids == _ids(second)
  assert len(ids) == len(set(ids)) == 12
  in_shard_order = [i.decode() for i in tf.data.TFRecordDataset(
      records_lib.Records.open(records).shard_paths('val')).map(
          lambda r: tf.io.parse_single_example(r, schema.feature_spec())[schema.ID_KEY])
                    .as_numpy_iterator()]
  assert ids == in_shard_order
  for images, labels, batch_ids in first:
    for image, label, example_id in zip(images.numpy(), labels.numpy(), batch_ids.numpy()):
      example_id = example_id.decode()
      assert label == truth[example_id]
      np.testing.assert_array_equal(image, _crop(kaggle_dir, example_id))


def test_test_split_has_every_id_with_label_minus_one(records, kaggle_dir):
  ds = pipeline.make_dataset(str(records), 'test', batch_size=4, training=False, with_ids=True)
  batches = _epoch(ds)
  assert sorted(_ids(batches)) == sorted(p.stem for p in (kaggle_dir / 'test').iterdir())
  assert {float(l) for b in batches for l in b[1].numpy()} == {-1.0}


@pytest.mark.parametrize('cache', [True, False])
def test_augmentation_keeps_pixels_and_labels(records, kaggle_dir, truth, cache):
  ds = pipeline.make_dataset(str(records), 'train', batch_size=16, training=True, augment=True,
                             cache=cache, with_ids=True)
  changed = 0
  for images, labels, ids in ds:
    for image, label, example_id in zip(images.numpy(), labels.numpy(), ids.numpy()):
      example_id = example_id.decode()
      source = _crop(kaggle_dir, example_id)
      assert label == truth[example_id]
      pixels = lambda a: collections.Counter(map(bytes, a.reshape(-1, 3)))
      assert pixels(image) == pixels(source)
      changed += not np.array_equal(image, source)
  assert changed >= 16  # 7 of 8 transforms move pixels.


@pytest.fixture(scope='module')
def small_records(tmp_path_factory):
  """200 labelled patches at crop 8: enough for batches of 64, cheap to compare."""
  return synthetic_records(tmp_path_factory.mktemp('small'), num_train=200, num_test=0, seed=5,
                           crop_size=8, val_fraction=0.1)


def _originals(records_dir):
  ds = pipeline.make_dataset(str(records_dir), 'train', batch_size=64, training=False,
                             with_ids=True)
  return {i.decode(): image for images, _, ids in ds
          for image, i in zip(images.numpy(), ids.numpy())}


def _which_transform(image, source, table):
  """The k with image == transform k of source, or None when it is ambiguous."""
  views = [source.reshape(-1, 3)[table[k]].reshape(source.shape) for k in range(8)]
  matches = [k for k, v in enumerate(views) if np.array_equal(v, image)]
  return matches[0] if len(matches) == 1 else (-1 if not matches else None)


# Chi-square critical value, 7 degrees of freedom, p = 0.001: a fair 8-sided
# draw exceeds it once in a thousand seeds; a missing transform or one drawn
# twice as often exceeds it many times over at these counts.
_CHI2_7_P001 = 24.32


def _chi_square(counts, n):
  expected = n / 8
  return sum((counts.get(k, 0) - expected) ** 2 / expected for k in range(8))


# The three ways a batch is augmented: gathered from the cached variants, or
# transformed after its gather from the cache (no budget for variants) or
# from the records re-read each epoch.
_AUGMENT_PATHS = {'variants': dict(cache=True, augment=augment.Augment(dihedral=True)),
                  'per_batch': dict(cache=True,
                                    augment=augment.Augment(dihedral=True, variant_budget=0)),
                  'uncached': dict(cache=False, augment=augment.Augment(dihedral=True))}


@pytest.mark.parametrize('path', sorted(_AUGMENT_PATHS))
@pytest.mark.parametrize('batch_size', [4, 12, 64])
def test_augmentation_is_uniform_per_image_at_any_batch_size(small_records, batch_size, path):
  """Fails for by-position transforms (batch 4 never rotates by 90), per-image or per-batch ones."""
  originals = _originals(small_records)
  table = augment.dihedral_permutations(8)
  epochs = {4: 4, 12: 8, 64: 24}[batch_size]
  ds = pipeline.make_dataset(str(small_records), 'train', batch_size=batch_size,
                             training=True, seed=5, with_ids=True, num_epochs=epochs,
                             **_AUGMENT_PATHS[path])
  per_image = collections.defaultdict(list)
  per_batch = []
  for images, labels, ids in ds:
    batch = []
    for image, label, example_id in zip(images.numpy(), labels.numpy(), ids.numpy()):
      example_id = example_id.decode()
      k = _which_transform(image, originals[example_id], table)
      assert k != -1, example_id  # Always a transform of its own record.
      if k is not None:  # (Skip the rare symmetric crop.)
        per_image[example_id].append(k)
        batch.append(k)
    per_batch.append(batch)
  draws = [k for ks in per_image.values() for k in ks]
  assert len(draws) > 600
  counts = collections.Counter(draws)
  assert _chi_square(counts, len(draws)) < _CHI2_7_P001, counts
  # Mixed within a batch (not one transform per batch) ...
  assert np.mean([len(set(b)) for b in per_batch]) > min(batch_size, 8) * 0.5
  # ... and several per image over the epochs (not one fixed per image).
  assert np.mean([len(set(ks)) for ks in per_image.values()]) >= min(epochs, 8) * 0.5


@pytest.mark.parametrize('batch', [1, 4, 12, 64])
def test_random_dihedral_eager_and_in_map(batch):
  images = np.random.default_rng(batch).integers(0, 256, (batch, 4, 4, 3), dtype=np.uint8)
  table = augment.dihedral_permutations(4)
  seed = tf.constant([3, batch], tf.int64)
  eager = augment.random_dihedral(tf.constant(images), seed).numpy()
  mapped = next(iter(tf.data.Dataset.from_tensors(images).map(
      lambda x: augment.random_dihedral(x, seed)))).numpy()
  np.testing.assert_array_equal(eager, mapped)  # The same draw from the same seed.
  for i in range(batch):  # Each position holds its own image, transformed.
    assert _which_transform(eager[i], images[i], table) is not None


def test_random_dihedral_draws_are_uniform_and_independent_of_position():
  images = np.arange(4 * 4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 4, 3)  # No symmetric one.
  table = augment.dihedral_permutations(4)
  by_position = collections.defaultdict(collections.Counter)
  for s in range(400):
    out = augment.random_dihedral(tf.constant(images), tf.constant([s, 0], tf.int64)).numpy()
    for i in range(4):
      by_position[i][_which_transform(out[i], images[i], table)] += 1
  for i, counts in by_position.items():  # Every position draws all 8, evenly.
    assert _chi_square(counts, 400) < _CHI2_7_P001, (i, counts)


def test_every_augmentation_path_gives_the_same_batches(small_records, tmp_path, caplog):
  """The same seed: the same batches, byte for byte, whichever way they are augmented."""
  # Two shards of 90: larger than any read-ahead block, so a reader that
  # interleaved shards would order the split differently from the cache.
  records = tmp_path / 'rec'
  run_convert(small_records.parent / 'kaggle', records, crop_size=8, val_fraction=0.1,
              num_shards=2)
  def batches(cache=True, **budget):
    options = augment.Augment(dihedral=True, stain_jitter=0.05, **budget)
    ds = pipeline.make_dataset(str(records), 'train', batch_size=12, training=True,
                               augment=options, seed=9, with_ids=True, num_epochs=3, cache=cache)
    return [tuple(t.numpy() for t in batch) for batch in ds]
  with caplog.at_level(logging.WARNING):
    fitted = batches()
    assert not caplog.records  # 180 examples at 8x8 fit the default budget.
    count = records_lib.Records.open(records).count('train')
    exact = batches(variant_budget=8 * count * 8 * 8 * 3)  # Just fits.
    assert not caplog.records
    fallback = batches(variant_budget=8 * count * 8 * 8 * 3 - 1)
    assert len(caplog.records) == 1
    uncached = batches(cache=False)
    chosen = batches(variant_budget=0)  # No variants, asked for: nothing to say.
  assert len(fitted) == len(fallback) == 3 * (count // 12)
  for path in (exact, fallback, uncached, chosen):
    assert len(path) == len(fitted)
    for a, b in zip(fitted, path):
      for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
  said = [r.getMessage() for r in caplog.records]
  assert len(said) == 1 and 'over the' in said[0] and str(records) in said[0], said


@pytest.mark.parametrize('cache', [True, False])
def test_transform_ids_for_the_device_give_the_pipelines_own_batches(small_records, cache,
                                                                      monkeypatch, caplog):
  """augment_on=device: the pipeline gathers the plain images and yields each one's transform
  id (in a dict after the ids, beside the stain maps); the step's `apply_dihedral_ids` then
  makes the host path's batches bit for bit. The split is never held 8 times for it."""
  common = dict(batch_size=12, training=True, seed=9, with_ids=True, num_epochs=3, cache=cache)
  host = pipeline.make_dataset(str(small_records), 'train', **common, augment=augment.Augment(
      dihedral=True, stain_jitter=0.05))
  plain = pipeline.make_dataset(str(small_records), 'train', **common)
  held = []
  real_load = split_cache.load_split
  monkeypatch.setattr(split_cache, 'load_split',
                      lambda *a: held.append(a[-1]) or real_load(*a))
  with caplog.at_level(logging.WARNING):
    drawn = pipeline.make_dataset(str(small_records), 'train', **common, augment=augment.Augment(
        dihedral=True, stain_jitter=0.05, stain_on_device=True, dihedral_on_device=True,
        variant_budget=1))  # (Variants would be over budget: nothing to say of them.)
    device_batches = list(drawn)
  assert held == ([False] if cache else []) and not caplog.records
  step = tf.function(lambda images, t, maps: augment.apply_stain(
      augment.apply_dihedral_ids(images, t), maps))
  n, seen = 0, collections.Counter()
  for (images, labels, ids), (raw, *_), (raw2, labels2, ids2, drawn_here) in zip(
      host, plain, device_batches):
    assert sorted(drawn_here) == ['dihedral', 'stain']
    t, maps = drawn_here['dihedral'], drawn_here['stain']
    assert t.dtype == tf.int32 and t.shape == (12,) and maps.shape == (12, 4, 3)
    np.testing.assert_array_equal(raw2, raw)  # The host only gathers.
    np.testing.assert_array_equal(step(raw2, t, maps), images)
    np.testing.assert_array_equal(labels2, labels)
    np.testing.assert_array_equal(ids2, ids)
    seen.update(t.numpy().tolist())
    n += 1
  assert n == len(device_batches) == 3 * (records_lib.Records.open(small_records).count('train')
                                          // 12)
  assert sorted(seen) == list(range(8))
  # Ids apply per position: a replica's half of the batch with its half of the ids.
  halves = [step(raw2[i:i + 6], t[i:i + 6], maps[i:i + 6]) for i in (0, 6)]
  np.testing.assert_array_equal(np.concatenate(halves), images)
  with pytest.raises(ValueError, match='dihedral_on_device=True needs dihedral=True'):
    augment.Augment(dihedral_on_device=True)


def test_the_steps_dihedral_uses_only_ops_gpu_determinism_allows():
  """`apply_dihedral_ids` runs on the accelerator, where --seed turns TF's op determinism on:
  an op TF refuses there (DenseBincount, as tf.math.bincount once grouped the ids; the
  segment sums; scatters) would stop the first seeded step on a GPU. Every op here is a
  data move, a comparison or an integer count."""
  traced = tf.function(augment.apply_dihedral_ids).get_concrete_function(
      tf.TensorSpec([None, 8, 8, 3], tf.uint8), tf.TensorSpec([None], tf.int32))
  ops = {op.type for op in traced.graph.get_operations()}
  allowed = {'Cast', 'Const', 'DynamicStitch', 'GatherV2', 'Identity', 'Less', 'Neg', 'Pack',
             'Placeholder', 'Range', 'Reshape', 'ReverseV2', 'Shape', 'StridedSlice', 'Sub',
             'Sum', 'TopKV2', 'Transpose'}
  assert ops <= allowed, ops - allowed
  order, bounds = augment.group_dihedral(tf.constant([3, 0, 7, 7, 1, 3, 3, 5]))
  assert order.numpy().tolist() == [1, 4, 0, 5, 6, 7, 2, 3]
  assert bounds.numpy().tolist() == [0, 1, 2, 2, 5, 5, 6, 6, 8]


def test_keras_fit_refuses_draws_left_for_the_device(small_records):
  """Keras takes a batch's third element for sample weights: the draws must make `fit` fail,
  not weigh each image by its transform id and train on unaugmented images."""
  import keras  # pylint: disable=g-import-not-at-top
  for options in (augment.Augment(dihedral=True, dihedral_on_device=True),
                  augment.Augment(stain_jitter=0.05, stain_on_device=True)):
    ds = pipeline.make_dataset(str(small_records), 'train', batch_size=16, training=True,
                               seed=0, augment=options)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(1, activation='sigmoid')])
    model.compile('adam', 'binary_crossentropy')
    with pytest.raises(TypeError):
      model.fit(ds, epochs=1, verbose=0)


def test_load_split_with_variants_holds_transform_t_of_image_i_at_t_count_plus_i(records):
  opened = records_lib.Records.open(records)
  paths, count, shape = opened.shard_paths('train'), opened.count('train'), opened.image_shape
  parse = lambda x: pipeline.parse_batch(x, shape, with_ids=True)
  images, labels, ids = split_cache.load_split(paths, count, parse)
  variants, labels8, ids8 = split_cache.load_split(paths, count, parse, variants=True)
  assert variants.shape == (8 * count, *shape) and variants.dtype == tf.uint8
  np.testing.assert_array_equal(labels8, labels)
  np.testing.assert_array_equal(ids8, ids)
  for t in range(8):
    np.testing.assert_array_equal(variants[t * count:(t + 1) * count],
                                  augment.dihedral_transform(images, t))


@pytest.mark.parametrize('k', range(8))
def test_dihedral_transform_matches_the_permutation_table_eager_and_in_map(k):
  images = np.random.default_rng(k).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
  table = augment.dihedral_permutations(6)
  expected = images.reshape(5, 36, 3)[:, table[k]].reshape(images.shape)
  np.testing.assert_array_equal(augment.dihedral_transform(tf.constant(images), k), expected)
  mapped = tf.data.Dataset.from_tensors(images).map(lambda x: augment.dihedral_transform(x, k))
  np.testing.assert_array_equal(next(iter(mapped)), expected)
  for t in range(4):  # Transforms 0-3 are np.rot90; 4-7 the same after a flip.
    if k == t:
      np.testing.assert_array_equal(expected, np.rot90(images, t, axes=(1, 2)))
    if k == t + 4:
      np.testing.assert_array_equal(expected, np.rot90(images[:, :, ::-1], t, axes=(1, 2)))


def test_uint8_images_are_transposed_without_a_transpose_op():
  """TensorFlow's oneDNN pass logs an error record for a uint8 Transpose in a graph."""
  graph = tf.function(lambda x: [augment.dihedral_transform(x, k) for k in range(8)])
  ops = {op.type for op in graph.get_concrete_function(
      tf.TensorSpec([None, 6, 6, 3], tf.uint8)).graph.get_operations()}
  assert 'Transpose' not in ops and 'GatherV2' in ops
  images = np.random.default_rng(0).integers(0, 256, (2, 6, 6, 3)).astype(np.float32)
  table = augment.dihedral_permutations(6)  # Float images (the model's side) take tf.transpose.
  np.testing.assert_array_equal(augment.dihedral_transform(tf.constant(images), 5),
                                images.reshape(2, 36, 3)[:, table[5]].reshape(images.shape))


def test_parse_batch_eager_and_in_map(records):
  serialized = next(iter(tf.data.TFRecordDataset(
      records_lib.Records.open(records).shard_paths('val')).batch(3)))
  eager = pipeline.parse_batch(serialized, (32, 32, 3), with_ids=True)
  mapped = next(iter(tf.data.Dataset.from_tensors(serialized).map(
      lambda s: pipeline.parse_batch(s, (32, 32, 3), with_ids=True))))
  for a, b in zip(eager, mapped):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert eager[0].shape == (3, 32, 32, 3) and eager[1].dtype == tf.float32


def test_bad_arguments_and_folders(records, tmp_path):
  with pytest.raises(schema.ManifestError, match='manifest.json: missing'):
    pipeline.make_dataset(str(tmp_path), 'train', batch_size=4, training=True)
  with pytest.raises(schema.ManifestError, match="no split 'valid'"):
    pipeline.make_dataset(str(records), 'valid', batch_size=4, training=True)
  with pytest.raises(ValueError, match='augment='):
    pipeline.make_dataset(str(records), 'train', batch_size=4, training=True, augment='mixup')
  with pytest.raises(ValueError, match='fewer than one batch of 1000'):
    pipeline.make_dataset(str(records), 'train', batch_size=1000, training=True)


def test_load_split_holds_every_record_in_shard_order(records):
  opened = records_lib.Records.open(records)
  paths, count = opened.shard_paths('train'), opened.count('train')
  parse = lambda x: pipeline.parse_batch(x, (32, 32, 3), with_ids=True)
  images, labels, ids = split_cache.load_split(paths, count, parse)
  expected = [parse(b) for b in tf.data.TFRecordDataset(paths).batch(count)][0]
  np.testing.assert_array_equal(images.numpy(), expected[0].numpy())
  np.testing.assert_array_equal(labels.numpy(), expected[1].numpy())
  assert ids.numpy().tolist() == expected[2].numpy().tolist()
  assert images.dtype == tf.uint8 and images.shape == (count, 32, 32, 3)
  for wrong in (count - 1, count + 1):  # A manifest that lies about the shards.
    with pytest.raises(schema.ManifestError, match='another number of records'):
      split_cache.load_split(paths, wrong, parse)


# skimage.color.rgb_from_hed, written out here: the reference the pipeline's
# HED conversion is checked against, not imported from it.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def _hed(image):
  od = np.log(np.maximum(image / 255.0, 1e-6)) / np.log(1e-6)
  return od @ np.linalg.inv(_RGB_FROM_HED)


def _stain_batches(records_dir, strength, dihedral=False, seed=4, epochs=2):
  options = augment.Augment(dihedral=dihedral, stain_jitter=strength)
  return list(pipeline.make_dataset(str(records_dir), 'train', batch_size=16, training=True,
                                    augment=options, seed=seed, with_ids=True,
                                    num_epochs=epochs))


def _affine_fits(sources, outputs):
  """(scale, shift, spread of the input) per image and stain, fitted where the map is visible."""
  fits = []
  for source, image in zip(sources, outputs):
    # Not clipped at white, and not so dark that uint8 rounding moves the
    # optical density by more than a few thousandths.
    usable = ((image < 255) & (source >= 16) & (image >= 16)).all(-1)
    if usable.sum() < 8:
      continue
    hed_in, hed_out = _hed(source)[usable], _hed(image)[usable]
    for c in range(3):
      a, b = np.polyfit(hed_in[:, c], hed_out[:, c], 1)
      residual = hed_out[:, c] - (a * hed_in[:, c] + b)
      assert np.abs(residual).max() < 1e-2, (c, a, b)  # Affine, up to uint8 rounding.
      fits.append((a, b, np.ptp(hed_in[:, c])))
  return np.array(fits)


def test_stain_jitter_scales_and_shifts_each_images_stains_within_s():
  strength = 0.1
  images = np.random.default_rng(0).integers(16, 256, (64, 16, 16, 3), dtype=np.uint8)
  out = augment.stain_jitter(tf.constant(images), strength, tf.constant([7, 1], tf.int64))
  fits = _affine_fits(images, out.numpy())
  assert len(fits) >= 48 * 3  # (Images clipped at white almost everywhere are left out.)
  scales, shifts = np.abs(fits[:, 0] - 1), np.abs(fits[:, 1])
  assert scales.max() <= strength + 0.01 and shifts.max() <= strength + 0.01
  assert scales.max() >= 0.9 * strength and shifts.max() >= 0.9 * strength  # The whole range,
  assert np.std(fits[:, 0]) > strength / 4  # drawn per image and stain.


def test_stain_jitter_in_the_pipeline_is_affine_in_hed_per_image(small_records):
  strength = 0.05
  originals = _originals(small_records)
  sources, outputs = [], []
  for images, _, ids in _stain_batches(small_records, strength):
    outputs.extend(images.numpy())
    sources.extend(originals[i.decode()] for i in ids.numpy())
  fits = _affine_fits(sources, outputs)
  assert len(fits) > 3 * 100  # Most images were checked.
  # Where a stain varies enough across the patch to fit its slope well.
  wide = fits[fits[:, 2] >= 0.04]
  assert len(wide) > 50
  assert np.abs(wide[:, 0] - 1).max() <= strength + 0.03
  assert np.std(wide[:, 0]) > strength / 8  # Not one draw for all images.


def test_stain_jitter_zero_changes_nothing_and_keeps_labels(small_records, kaggle_dir):
  plain = _stain_batches(small_records, 0.0, dihedral=True)
  default = list(pipeline.make_dataset(str(small_records), 'train', batch_size=16,
                                       training=True, augment=True, seed=4, with_ids=True,
                                       num_epochs=2))
  for x, y in zip(plain, default):
    for a, b in zip(x, y):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
  jittered = _stain_batches(small_records, 0.2, dihedral=True)
  for x, y in zip(plain, jittered):  # The same examples, labels and ids, other colours.
    np.testing.assert_array_equal(x[1].numpy(), y[1].numpy())
    np.testing.assert_array_equal(x[2].numpy(), y[2].numpy())
    assert not np.array_equal(x[0].numpy(), y[0].numpy())


def test_stain_jitter_composes_with_the_dihedral_transform(small_records):
  """Each output is a per-pixel colour map of one of the 8 transforms of its record."""
  originals = _originals(small_records)
  table = augment.dihedral_permutations(8)
  for images, _, ids in _stain_batches(small_records, 0.05, dihedral=True, epochs=1):
    for image, example_id in zip(images.numpy(), ids.numpy()):
      source = originals[example_id.decode()]
      fits = []
      for k in range(8):
        view = source.reshape(-1, 3)[table[k]]
        colour_map = {}
        fits.append(all(colour_map.setdefault(bytes(s), bytes(o)) == bytes(o)
                        for s, o in zip(view, image.reshape(-1, 3))))
      assert any(fits), example_id


def test_stain_jitter_out_of_range_is_refused():
  for strength in (-0.1, 1.0):
    with pytest.raises(ValueError, match=f'stain_jitter={strength}: must be in'):
      augment.Augment(stain_jitter=strength)


def _stain_reference(images, alpha, beta, rows=(0, 1, 2), shift_first=False):
  """Tellez et al.'s jitter in float64: HED as skimage (unclipped), c -> alpha * c + beta.

  rows / shift_first: the mutations the tests must tell apart (stain rows
  permuted; (c + beta) * alpha).
  """
  hed = _hed(images.astype(np.float64))[..., list(rows)]
  a, b = alpha[:, None, None], beta[:, None, None]
  hed = (hed + b) * a if shift_first else a * hed + b
  hed = hed[..., np.argsort(rows)]
  rgb = np.clip(np.exp(hed @ _RGB_FROM_HED * np.log(1e-6)), 0, 1)
  return np.round(rgb * 255)


def test_apply_stain_is_tellez_alpha_c_plus_beta_in_hed_to_one_level():
  """Stains scaled and shifted apart, so a swap of H and E, or shifting before scaling, shows."""
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  alpha = np.array([[1.3, 0.8, 1.0], [0.7, 1.2, 1.1], [1.0, 1.0, 1.0], [1.25, 0.75, 0.9]])
  beta = np.array([[0.05, -0.04, 0.0], [-0.03, 0.06, 0.02], [0.0, 0.0, 0.0], [0.04, 0.05, -0.02]])
  draws = tf.constant(np.stack([alpha, beta], 1), tf.float32)
  out = augment.apply_stain(images, augment.stain_transform(draws)).numpy().astype(np.float64)
  reference = _stain_reference(images, alpha, beta)
  assert np.abs(out - reference).max() <= 1
  np.testing.assert_array_equal(out[2], images[2])  # alpha 1, beta 0: the image itself.
  for mutation in (dict(rows=(1, 0, 2)), dict(shift_first=True)):  # What this test tells apart.
    assert np.abs(_stain_reference(images, alpha, beta, **mutation) - reference).max() > 3
  # The same through stain_jitter's own draws, as the pipeline makes them.
  seed = tf.constant([3, 9], tf.int64)
  drawn = augment.draw_stain(4, 0.05, seed).numpy().astype(np.float64)
  out = augment.stain_jitter(tf.constant(images), 0.05, seed).numpy().astype(np.float64)
  assert np.abs(out - _stain_reference(images, drawn[:, 0], drawn[:, 1])).max() <= 1
  # Near-white pixels pushed past white (exp(...) over 255) stay white: clipped, not wrapped.
  bright = np.full((1, 4, 4, 3), 250, np.uint8)
  lighter = tf.constant([[[1.0, 1.0, 1.0], [-0.05, -0.05, -0.05]]], tf.float32)
  reference = _stain_reference(bright, np.ones((1, 3)), np.full((1, 3), -0.05))
  assert (reference == 255).all()
  np.testing.assert_array_equal(
      augment.apply_stain(bright, augment.stain_transform(lighter)).numpy(), reference)


def test_apply_stain_is_bit_identical_in_a_dataset_and_in_a_compiled_step():
  """Grappler folds constants in a tf.function's graph, not in tf.data's functions: the
  formula must leave it nothing to fold (the two conversions in a row rounded 8 of these
  786,432 values the other way)."""
  images = np.random.default_rng(0).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
  maps = augment.stain_transform(augment.draw_stain(256, 0.05, tf.constant([1, 2], tf.int64)))
  in_dataset = next(iter(tf.data.Dataset.from_tensors((images, maps)).map(
      augment.apply_stain))).numpy()
  in_step = tf.function(augment.apply_stain)
  np.testing.assert_array_equal(in_step(images, maps).numpy(), in_dataset)
  halves = [in_step(images[i:i + 128], maps[i:i + 128]).numpy() for i in (0, 128)]
  np.testing.assert_array_equal(np.concatenate(halves), in_dataset)  # As two replicas.


def test_stain_maps_for_the_device_are_the_maps_the_pipeline_applies(small_records):
  common = dict(batch_size=16, training=True, seed=4, num_epochs=2)
  applied = pipeline.make_dataset(str(small_records), 'train', **common,
                                  augment=augment.Augment(dihedral=True, stain_jitter=0.1))
  drawn = pipeline.make_dataset(str(small_records), 'train', **common, augment=augment.Augment(
      dihedral=True, stain_jitter=0.1, stain_on_device=True))
  n = 0
  for (images, labels), (raw, raw_labels, drawn_maps) in zip(applied, drawn):
    assert list(drawn_maps) == ['stain']
    maps = drawn_maps['stain']
    assert maps.shape == (16, 4, 3) and maps.dtype == tf.float32
    assert len({m.tobytes() for m in maps.numpy()}) == 16  # Drawn per image.
    np.testing.assert_array_equal(tf.function(augment.apply_stain)(raw, maps), images)
    np.testing.assert_array_equal(raw_labels, labels)
    assert not np.array_equal(raw, images)
    n += 1
  assert n == 2 * (records_lib.Records.open(small_records).count('train') // 16)
  with pytest.raises(ValueError, match='stain_on_device=True needs'):
    augment.Augment(stain_on_device=True)
