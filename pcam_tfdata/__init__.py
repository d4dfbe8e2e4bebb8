"""PatchCamelyon as TFRecord shards, a tf.data pipeline, and the seed's CNNs under tf.distribute.

The library, for notebooks and your own code:

    import pcam_tfdata as pt
    pt.make_synthetic('demo_kaggle', num_train=2000, num_test=200)  # or Kaggle's download
    pt.make_records('demo_kaggle', 'demo_records', per_class=800)
    train = pt.make_dataset('demo_records', 'train', batch_size=64, training=True,
                            augment=True, seed=0)
    val = pt.make_dataset('demo_records', 'val', batch_size=256, training=False)
    model = pt.build_model('baseline', pt.Records.open('demo_records').image_shape)
    model.compile('adam', 'binary_crossentropy', metrics=['accuracy'])
    model.fit(train, validation_data=val, epochs=3)

or the whole recipe, as the commands run it: `pt.train(records_dir,
model_dir, **flags)` and `pt.predict(model_dir, records_dir)`. Each name in
`__all__` has a docstring with an example.

`import pcam_tfdata` imports no TensorFlow: the converter never needs it
(`pcam_tfdata.convert`, which worker processes import); the training half
(`pcam_tfdata.training`) loads it when a name from it is first used. The
commands (`python -m pcam_tfdata.train`, tools/*.py, the pcam-* console
scripts) only turn flags into these calls.
"""

import importlib
import sys
import types

__version__ = '0.1.0'  # The package's (setup.cfg reads it here).

__all__ = [
    'make_synthetic', 'StandIn', 'make_records', 'Records', 'make_dataset', 'Augment', 'build_model',
    'train', 'predict', 'write_submission', 'tune',
]

# Each public name, and the module it lives in (imported on first use).
_HOMES = {
    'make_synthetic': ('pcam_tfdata.convert.synthetic', 'make_dataset'),
    'StandIn': ('pcam_tfdata.convert.standin', 'StandIn'),
    'make_records': ('pcam_tfdata.convert.api', 'make_records'),
    'Records': ('pcam_tfdata.records', 'Records'),
    'make_dataset': ('pcam_tfdata.training.pipeline', 'make_dataset'),
    'Augment': ('pcam_tfdata.training.augment', 'Augment'),
    'build_model': ('pcam_tfdata.training.models', 'build_model'),
    'train': ('pcam_tfdata.training.api', 'train'),
    'predict': ('pcam_tfdata.training.api', 'predict'),
    'write_submission': ('pcam_tfdata.training.submission', 'write_submission'),
    'tune': ('pcam_tfdata.tuning.api', 'tune'),
}


def __getattr__(name):
  if name not in _HOMES:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module, attribute = _HOMES[name]
  value = getattr(importlib.import_module(module), attribute)
  globals()[name] = value
  return value


def __dir__():
  # The public names (and the version), not the modules this file imports.
  return sorted(__all__ + ['__version__'])


class _Package(types.ModuleType):
  """Keeps `pt.train` and `pt.predict` the functions once their commands' modules load.

  `pcam_tfdata.train` and `pcam_tfdata.predict` are also modules (the
  commands `python -m pcam_tfdata.train` and `.predict`). Importing one
  (`from pcam_tfdata.train import Config`) makes Python set it as this
  package's attribute of that name, which would hide the function.
  """

  def __setattr__(self, name, value):
    if name in _HOMES and isinstance(value, types.ModuleType):
      return  # The submodule stays reachable as sys.modules['pcam_tfdata.<name>'].
    super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
