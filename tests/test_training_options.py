"""The optimisation flags a search draws: --lr_schedule, --warmup_epochs, --dropout, --weight_decay, --label_smoothing."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from pcam_tfdata.training import config as config_lib
from pcam_tfdata.training import loop
from pcam_tfdata.training import models
from pcam_tfdata.training import resume
from pcam_tfdata.training import schedules
from pcam_tfdata.training import trainer


def _rates(kind, warmup_epochs, steps=10, epochs=4, peak=1e-2):
  schedule = schedules.Schedule(kind, peak, steps, epochs, warmup_epochs)
  return np.array([float(schedule(step)) for step in range(steps * epochs)]), schedule


def test_cosine_warms_up_linearly_then_decays_to_zero_at_the_last_step():
  rates, _ = _rates('cosine', 1)
  np.testing.assert_allclose(rates[:10], 1e-2 * np.arange(1, 11) / 10, rtol=1e-6)
  assert rates[10] == pytest.approx(1e-2) and np.all(np.diff(rates[10:]) < 0)
  assert rates[-1] == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 29 / 30)), rel=1e-5)
  assert rates[25] == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 15 / 30)), rel=1e-5)


def test_onecycle_starts_at_a_25th_peaks_after_the_warmup_and_ends_ten_thousand_times_lower():
  rates, schedule = _rates('onecycle', 0)  # 30% of 40 steps: 12.
  assert schedule.warmup == 12
  assert rates[0] == pytest.approx(1e-2 / 25, rel=1e-5)
  assert rates.argmax() == 12 and rates[12] == pytest.approx(1e-2)
  assert np.all(np.diff(rates[:13]) > 0) and np.all(np.diff(rates[12:]) < 0)
  end = schedules.Schedule('onecycle', 1e-2, 10, 4, 0)(40)
  assert float(end) == pytest.approx(1e-2 / 25 / 1e4, rel=1e-4)


def test_plateau_with_warmup_rises_then_holds_and_its_halvings_scale_it():
  rates, schedule = _rates('plateau', 0.5)
  np.testing.assert_allclose(rates[:5], 1e-2 * np.arange(1, 6) / 5, rtol=1e-6)
  assert np.all(rates[5:] == rates[5]) and rates[5] == pytest.approx(1e-2)
  schedule.scale.assign(0.5)
  assert float(schedule(30)) == pytest.approx(5e-3)
  # Only the default keeps the optimizer's plain variable.
  assert not schedules.uses_schedule(config_lib.Config('', ''))
  assert schedules.uses_schedule(config_lib.Config('', '', warmup_epochs=0.5))
  assert schedules.uses_schedule(config_lib.Config('', '', lr_schedule='cosine'))


def _build(config, records_shape=(32, 32, 3)):
  setup = types.SimpleNamespace(strategy=tf.distribute.get_strategy(), sync_batch_norm=False,
                                policy='float32')
  records = types.SimpleNamespace(image_shape=records_shape)
  return trainer.build_model(config, records, setup, steps_per_epoch=10)


@pytest.mark.parametrize('model, dropout, rate', [
    ('baseline', None, 0.2), ('batchnorm', None, 0.5), ('baseline', 0.35, 0.35),
    ('batchnorm', 0.0, 0.0)])
def test_dropout_defaults_to_the_seeds_rate_per_model(model, dropout, rate):
  built = models.build_model(model, dropout=dropout)
  assert built.get_layer('dropout').rate == rate


def test_weight_decay_trains_with_adamw_and_a_schedule_rides_the_step_counter(tmp_path):
  model, optimizer = _build(config_lib.Config('', str(tmp_path), weight_decay=1e-3,
                                              lr_schedule='cosine'))
  assert isinstance(optimizer, keras.optimizers.AdamW) and optimizer.weight_decay == 1e-3
  assert schedules.of(optimizer) is not None
  model, optimizer = _build(config_lib.Config('', str(tmp_path)))
  assert type(optimizer) is keras.optimizers.Adam and schedules.of(optimizer) is None


def test_label_smoothing_changes_the_training_loss_not_the_accuracy():
  def one_step(smoothing):
    keras.utils.set_random_seed(0)
    model = models.build_model('baseline')
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    fn = loop.make_train_fn(model, optimizer, tf.distribute.get_strategy(), 8,
                            label_smoothing=smoothing)
    images = tf.cast(tf.random.stateless_uniform([8, 32, 32, 3], [1, 2], 0, 255), tf.uint8)
    labels = tf.constant([0, 1] * 4, tf.float32)
    loss, correct = fn(iter([(images, labels)]), tf.constant(1))
    return float(loss), float(correct)
  plain, smoothed = one_step(0.0), one_step(0.2)
  assert plain[1] == smoothed[1]  # The same first forward pass.
  assert plain[0] != pytest.approx(smoothed[0], rel=1e-3)


def test_a_scheduled_run_may_not_grow_its_epochs_on_resume():
  current = {**{key: None for key in resume._NAMES}, 'epochs': 6}  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r'--epochs: 4 then, 6 now \(--lr_schedule=cosine spans'):
    resume.check({'epochs': 4, 'lr_schedule': 'cosine'}, {**current, 'lr_schedule': 'cosine'},
                 'backup', trained=2)
  said = []  # The seed's plateau may grow, as before.
  resume.check({'epochs': 4, 'lr_schedule': 'plateau'}, {**current, 'lr_schedule': 'plateau'},
               'backup', log=said.append, trained=2)
  assert said


@pytest.mark.parametrize('flag, value, message', [
    ('dropout', 1.0, '--dropout=1.0: must be in [0, 1)'),
    ('weight_decay', -1e-4, '--weight_decay=-0.0001: must be >= 0'),
    ('weight_decay', float('nan'), '--weight_decay=nan: must be >= 0'),
    ('label_smoothing', 1.0, '--label_smoothing=1.0: must be in [0, 1)'),
    ('lr_schedule', 'step', '--lr_schedule=step: choose one of plateau, cosine, onecycle'),
    ('warmup_epochs', 10.0, '--warmup_epochs=10.0: must be >= 0 and below --epochs=10'),
])
def test_bad_values_are_refused_naming_the_flag(flag, value, message):
  with pytest.raises(ValueError) as e:
    config_lib.check_config(config_lib.Config('', '', **{flag: value}))
  assert str(e.value).startswith(message), str(e.value)
