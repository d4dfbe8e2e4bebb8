r"""Prints the seed's results table for several runs as Markdown, or a search's trials.

    python -m pcam_tfdata.report runs/demo/baseline runs/demo/batchnorm
    python -m pcam_tfdata.report studies/seed     # pcam-tune's --study_dir: best first
"""

import json
import sys

from pcam_tfdata import cli
from pcam_tfdata import fs
from pcam_tfdata import rundir
from pcam_tfdata.tuning import results

_COLUMNS = (('Train Accuracy', 'train_accuracy'), ('Train AUC', 'train_auc'),
            ('Validation Accuracy', 'val_accuracy'), ('Validation AUC', 'val_auc'))
PROGRAM = 'report'  # How its errors name it (also as __main__).


def table(model_dirs):
  """The Markdown table of the runs' metrics.json.

  Raises:
    ValueError: a folder without metrics.json (a run that has not finished).
  """
  lines = ['| Model | ' + ' | '.join(c for c, _ in _COLUMNS) + ' | Best epoch | Precision | Replicas |',
           '|---' * (len(_COLUMNS) + 4) + '|']
  for model_dir in model_dirs:
    path = fs.join(model_dir, rundir.METRICS_JSON)
    try:
      m = json.loads(fs.read_text(path))
    except (json.JSONDecodeError, *fs.errors()) as e:
      raise ValueError(f'{path}: no finished run here ({e.__class__.__name__})') from None
    name = {'baseline': 'Baseline', 'batchnorm': 'BatchNorm', 'resnet50v2': 'ResNet50V2',
            'efficientnetv2b0': 'EfficientNetV2B0'}.get(m['model'], m['model'])
    values = ' | '.join(f'{m[k]:.4f}' for _, k in _COLUMNS)
    lines.append(f'| {name} | {values} | {m["best_epoch"]} | {m["precision_policy"]} | '
                 f'{m["num_replicas_in_sync"]} |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) < 2:
    print('usage: python -m pcam_tfdata.report MODEL_DIR [MODEL_DIR ...] | STUDY_DIR',
          file=sys.stderr)
    sys.exit(2)
  cli.import_tensorflow_for(argv[1:])  # (A run in a bucket: read through TensorFlow.)
  try:
    if len(argv) == 2 and fs.exists(fs.join(argv[1], results.TRIALS_CSV)):
      print(results.table(argv[1]))
      return
    print(table(argv[1:]))
  except ValueError as e:
    cli.fail(PROGRAM, e)


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
