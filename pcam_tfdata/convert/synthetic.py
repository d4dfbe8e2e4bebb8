"""A synthetic data set in the exact Kaggle PCam layout and file format.

Patches are 96x96 RGB and look like H&E: pink stroma with purple nuclei. The
label depends only on the center 32x32: a positive carries a cluster of
large, dense, dark nuclei there (4 to 12 of them; in a third of positives only
2 to 4 small, faint ones). One to three large dark nuclei appear anywhere in
half of all patches of both classes, so a model
must see the cluster, not just dark pixels. Half of all patches, of either class, carry
the same cluster in the outer ring instead (never touching the center), so
the ring says nothing about the label and a pipeline that crops the wrong
region learns nothing. Every patch is drawn from its own seed, so the set is
the same for a seed however it is produced.
"""

import hashlib
import multiprocessing
import os
import shutil

import numpy as np
import pandas as pd
from PIL import Image

from pcam_tfdata import progress
from pcam_tfdata.convert import kaggle
from pcam_tfdata.convert import outdir
from pcam_tfdata.convert import pool as pool_lib

# Class ratio of the Kaggle training set: 89,117 of 220,025 are positive.
POSITIVE_FRACTION = 89117 / 220025
RING_CLUSTER_PROBABILITY = 0.5
SIZE = 96

_STROMA = np.array([234., 172., 206.])  # Eosin pink.
_LUMEN = np.array([246., 236., 242.])
_NUCLEUS = np.array([128., 82., 168.])  # Haematoxylin purple.
_TUMOUR = np.array([72., 34., 112.])
_CLUSTER_SPREAD = 7.0  # Max distance of a cluster nucleus from the cluster center.
_TUMOUR_RADIUS = (2.8, 5.5)
MIMIC_PROBABILITY = 0.5  # Lone large dark nuclei, anywhere, in either class.
SUBTLE_FRACTION = 0.35


def example_id(seed, split, index):
  """A 40-hex id, like Kaggle's, stable for (seed, split, index)."""
  return hashlib.sha1(f'pcam-synthetic/{seed}/{split}/{index}'.encode()).hexdigest()


def _smooth_noise(rng, cells):
  """Zero-mean noise on a coarse grid, bilinearly upsampled to SIZE x SIZE."""
  grid = rng.standard_normal((cells + 1, cells + 1))
  x = np.linspace(0, cells, SIZE)
  i = np.minimum(x.astype(int), cells - 1)
  f = x - i
  rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
  return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def _draw_nuclei(image, centers, radii, color, alpha, rng):
  """Blends soft-edged ellipses of `color` into `image` (float, in place)."""
  for (cy, cx), (ry, rx), a in zip(centers, radii, alpha):
    reach = max(ry, rx) + 1
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, SIZE)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, SIZE)
    if y0 >= y1 or x0 >= x1:
      continue
    yy, xx = np.ogrid[y0:y1, x0:x1]
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    mask = (np.clip((1.0 - d) * 3.0, 0.0, 1.0) * a)[..., None]
    tint = color + rng.normal(0, 8, 3)
    image[y0:y1, x0:x1] = image[y0:y1, x0:x1] * (1 - mask) + tint * mask


def _cluster(rng, center):
  """A tumour cell cluster; about a third are small and faint, like mimics."""
  subtle = rng.random() < SUBTLE_FRACTION
  n = rng.integers(2, 5) if subtle else rng.integers(4, 13)
  angle = rng.uniform(0, 2 * np.pi, n)
  dist = _CLUSTER_SPREAD * np.sqrt(rng.uniform(0, 1, n))
  centers = np.stack([center[0] + dist * np.sin(angle), center[1] + dist * np.cos(angle)], 1)
  radii = rng.uniform(2.6, 3.8, (n, 2)) if subtle else rng.uniform(*_TUMOUR_RADIUS, (n, 2))
  return centers, radii, rng.uniform(0.4, 0.75, n) if subtle else rng.uniform(0.6, 1.0, n)


def _ring_center(rng):
  """A cluster center whose nuclei all stay outside rows/cols 32..63."""
  margin = _CLUSTER_SPREAD + _TUMOUR_RADIUS[1] + 1.5  # Reach of the cluster.
  near = rng.uniform(margin - 6, 32 - margin)
  far = rng.uniform(64 + margin, SIZE - margin + 6)
  across = rng.uniform(6, SIZE - 6)
  side = near if rng.random() < 0.5 else far
  return (side, across) if rng.random() < 0.5 else (across, side)


def make_patch(rng, label):
  """One synthetic H&E patch, uint8 [96, 96, 3]."""
  stain = rng.normal(1.0, 0.06, 3)  # Stain and scanner vary from slide to slide.
  image = _STROMA * stain * (1 + 0.05 * _smooth_noise(rng, 6)[..., None])
  fibres = _smooth_noise(rng, 16)[..., None]
  image = image * (1 + 0.04 * fibres)
  lumen = np.clip(_smooth_noise(rng, 3) - 1.2, 0, 0.5)[..., None] * 2
  image = image * (1 - lumen) + _LUMEN * lumen

  n = rng.integers(20, 60)
  _draw_nuclei(image, rng.uniform(0, SIZE, (n, 2)), rng.uniform(1.2, 3.2, (n, 2)),
               _NUCLEUS * stain, rng.uniform(0.5, 0.95, n), rng)
  if rng.random() < MIMIC_PROBABILITY:
    n = rng.integers(1, 4)
    _draw_nuclei(image, rng.uniform(8, SIZE - 8, (n, 2)), rng.uniform(2.6, 4.2, (n, 2)),
                 _TUMOUR, rng.uniform(0.4, 0.9, n), rng)
  if label == 1:
    centers, radii, alpha = _cluster(rng, rng.uniform(40, 56, 2))
    _draw_nuclei(image, centers, radii, _TUMOUR, alpha, rng)
  if rng.random() < RING_CLUSTER_PROBABILITY:
    centers, radii, alpha = _cluster(rng, _ring_center(rng))
    _draw_nuclei(image, centers, radii, _TUMOUR, alpha, rng)
  image += rng.normal(0, 5, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def write_tiff(path, pixels):
  """Writes a patch exactly as the Kaggle files are: Pillow's baseline TIFF."""
  Image.fromarray(pixels).save(path, format='TIFF')


def _labels(num, seed):
  positives = int(round(num * POSITIVE_FRACTION))
  labels = np.array([1] * positives + [0] * (num - positives), dtype=np.int64)
  return np.random.default_rng([seed, 0]).permutation(labels)


def _write_patches(job):
  """Worker: writes the patches of `job` = (folder, seed, [(split code, index, label, id)])."""
  folder, seed, items = job
  for code, index, label, name in items:
    pixels = make_patch(np.random.default_rng([seed, code, index]), label)
    write_tiff(os.path.join(folder, name + kaggle.SUFFIX), pixels)
  return len(items)


def make_dataset(out_dir, num_train=6000, num_test=1000, seed=0, overwrite=False,
                 show_progress=True, workers=None, exist_ok=False):
  """Writes a synthetic PCam set in Kaggle's layout: train/, train_labels.csv, test/, sample_submission.csv.

  The patches are 96x96 RGB TIFFs named <40-hex id>.tif, as Kaggle's, with
  a label that depends only on the center 32x32 (see the module docstring).

  Example:

    import pcam_tfdata as pt
    pt.make_synthetic('demo_kaggle', num_train=2000, num_test=200)
    pt.make_records('demo_kaggle', 'demo_records', per_class=800)

  The folder appears only when complete: it is written under a temporary
  name and renamed at the end.

  Args:
    out_dir: the folder to create.
    num_train, num_test: patches per folder.
    seed: the set is a function of (num_train, num_test, seed).
    overwrite: replace an existing folder.
    show_progress: show a progress bar (a line every 30 s in a log file).
    workers: processes drawing patches (default: all cores).
    exist_ok: an existing folder is left as it is (the demo's: made by
      an earlier or a concurrent first run).

  Returns:
    The folder's path.

  Raises:
    ValueError: bad sizes, or `out_dir` exists and not `overwrite`;
      folderlock.FolderBusy: another process writes it.
  """
  if num_train < 2 or num_test < 0:
    raise ValueError(f'--num_train={num_train} must be >= 2 and --num_test={num_test} >= 0')
  with outdir.lock(out_dir, what=out_dir):  # (Two first runs of the demo at once.)
    if exist_ok and os.path.isdir(out_dir):
      return out_dir
    return _make_dataset(out_dir, num_train, num_test, seed, overwrite, show_progress, workers)


def _make_dataset(out_dir, num_train, num_test, seed, overwrite, show_progress, workers):
  if os.path.lexists(out_dir) and not overwrite:
    raise ValueError(f'--out_dir={out_dir}: exists; pass --overwrite to replace it')
  tmp = out_dir.rstrip('/') + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  jobs, frames = [], []
  # Test labels are drawn too, so test patches look like train ones, but not written.
  for code, folder, labels in ((1, kaggle.TRAIN_DIR, _labels(num_train, seed)),
                               (2, kaggle.TEST_DIR, _labels(num_test, seed + 1))):
    os.makedirs(os.path.join(tmp, folder))
    ids = [example_id(seed, folder, i) for i in range(len(labels))]
    frames.append(pd.DataFrame({'id': ids, 'label': labels}))
    items = [(code, i, int(l), n) for i, (l, n) in enumerate(zip(labels, ids))]
    jobs += [(os.path.join(tmp, folder), seed, items[k:k + 256])
             for k in range(0, len(items), 256)]
  workers = workers or pool_lib.default_workers()
  with progress.Progress(num_train + num_test, 'synthesizing', images_per_step=None,
                         unit='img', leave=True, enabled=show_progress) as bar:
    if workers == 1 or len(jobs) == 1:
      for job in jobs:
        bar.advance(_write_patches(job))
    else:
      # `spawn`: the caller may run TensorFlow threads that a fork would copy.
      with pool_lib.start_pool(multiprocessing.get_context('spawn'), workers) as pool:
        for n in pool.imap_unordered(_write_patches, jobs):
          bar.advance(n)
  frames[0].to_csv(os.path.join(tmp, kaggle.LABELS_CSV), index=False)
  frames[1].assign(label=0).to_csv(os.path.join(tmp, 'sample_submission.csv'), index=False)
  if os.path.lexists(out_dir):
    shutil.rmtree(out_dir)
  os.rename(tmp, out_dir)
  return out_dir
