"""Exact evaluation over whole splits, and the seed's plots.

Accuracy and AUC come from every prediction of a split (scikit-learn's exact
ROC AUC), not from Keras' streaming AUC, which bins scores into 200
thresholds.
"""

import csv
import io

import matplotlib
matplotlib.use('Agg')  # Files only; no display on training hosts.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from sklearn import metrics as sk_metrics
import tensorflow as tf

from pcam_tfdata import fs


def make_predict_fn(model):
  """A compiled forward pass in inference mode (dropout off, BN moving stats)."""
  @tf.function(reduce_retracing=True)
  def predict(images):
    return tf.reshape(model(images, training=False), [-1])
  return predict


def predict(predict_fn, dataset, bar=None):
  """Runs `predict_fn` over a dataset of (images, labels, ids) batches.

  Args:
    predict_fn: images -> probabilities [B].
    dataset: yields (images, labels, ids) batches.
    bar: an optional progress.Progress, told of each finished batch.

  Returns:
    (probabilities float32 [N], labels float32 [N], ids str [N]) in dataset order.
  """
  probs, labels, ids = [], [], []
  for step, (images, batch_labels, batch_ids) in enumerate(dataset, 1):
    probs.append(predict_fn(images).numpy())
    labels.append(batch_labels.numpy())
    ids.extend(i.decode() for i in batch_ids.numpy())
    if bar is not None:
      bar.update(step)
  return (np.concatenate(probs).astype(np.float32), np.concatenate(labels), np.asarray(ids))


def binary_metrics(labels, probs):
  """Exact accuracy (threshold 0.5), ROC AUC and log loss of a whole split."""
  labels = np.asarray(labels).astype(int)
  probs = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
  both_classes = len(np.unique(labels)) == 2
  return {
      'accuracy': float(np.mean((probs >= 0.5) == labels)),
      'auc': float(sk_metrics.roc_auc_score(labels, probs)) if both_classes else float('nan'),
      'loss': float(sk_metrics.log_loss(labels, probs, labels=[0, 1])),
  }


def plot_confusion_matrix(labels, probs, path, title):
  matrix = sk_metrics.confusion_matrix(np.asarray(labels).astype(int),
                                       (np.asarray(probs) >= 0.5).astype(int), labels=[0, 1])
  fig, ax = plt.subplots(figsize=(4.5, 4))
  sk_metrics.ConfusionMatrixDisplay(matrix, display_labels=['no tumour', 'tumour']).plot(
      ax=ax, colorbar=False, values_format='d')
  ax.set_title(title)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def plot_roc_curve(labels, probs, path, title):
  fpr, tpr, _ = sk_metrics.roc_curve(np.asarray(labels).astype(int), probs)
  fig, ax = plt.subplots(figsize=(4.5, 4))
  ax.plot(fpr, tpr, label=f'AUC = {sk_metrics.auc(fpr, tpr):.4f}')
  ax.plot([0, 1], [0, 1], '--', color='grey', lw=1)
  ax.set_xlabel('false positive rate')
  ax.set_ylabel('true positive rate')
  ax.set_title(title)
  ax.legend(loc='lower right')
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def plot_training_curves(history_csv, path, title):
  """Loss, accuracy and AUC per epoch, train against val, from history.csv."""
  rows = list(csv.DictReader(io.StringIO(fs.read_text(history_csv))))
  epochs = [int(r['epoch']) for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for ax, name in zip(axes, ('loss', 'accuracy', 'auc')):
    for prefix in ('train', 'val'):
      key = f'{prefix}_{name}'
      if rows and key in rows[0]:
        ax.plot(epochs, [float(r[key]) for r in rows], 'o-', label=prefix)
    ax.set_xlabel('epoch')
    ax.set_title(name)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def _save(fig, path):
  """Saves `fig` as a PNG at `path`, on any filesystem."""
  with fs.open(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=100)
