"""A synthetic data set in the exact Kaggle PCam layout and file format.

Two difficulties. `pcam` (standin.py) carries the properties of the real
data that decide modelling questions: slides from several centres, stain and
scanner shifts, tumour context, label noise, duplicates; it writes
`slides.csv`, `centres.csv` and `test_labels.csv` beside the labels. `demo`, the default, is
described here: every model solves it, so it shows the code works and says
nothing about which model or setting is better.

Demo patches are 96x96 RGB and look like H&E: pink stroma with purple nuclei. The
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
from pcam_tfdata.convert import standin

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


DIFFICULTIES = ('demo', 'pcam')
SLIDES_CSV = 'slides.csv'  # id,wsi: the form of the community's patch_id_wsi_full.csv.
CENTRES_CSV = 'centres.csv'  # id,centre.
TEST_LABELS_CSV = 'test_labels.csv'  # The stand-in's answer key for test/ (id,label).


def example_id(seed, split, index, difficulty='demo'):
  """A 40-hex id, like Kaggle's, stable for (seed, split, index); the two difficulties share none."""
  kind = 'pcam-synthetic' if difficulty == 'demo' else 'pcam-standin'
  return hashlib.sha1(f'{kind}/{seed}/{split}/{index}'.encode()).hexdigest()


_smooth_noise = standin.smooth_noise


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
  """Worker: writes the patches of `job` = (folder, seed, StandIn or None, items).

  An item is (split code, index, label, id, slide, source): the pixels are
  drawn from (seed, split code, source), so a duplicate (source != index)
  is a byte copy of its source; slide is (index, centre, tumour) or None.
  """
  folder, seed, params, items = job
  for code, _, label, name, slide, source in items:
    rng = np.random.default_rng([seed, code, source])
    if params is None:
      pixels = make_patch(rng, label)
    else:
      pixels = standin.make_patch(rng, label, standin.make_slide(params, seed, *slide), params)
    write_tiff(os.path.join(folder, name + kaggle.SUFFIX), pixels)
  return len(items)


def _as_params(difficulty):
  """None for the demo, else the stand-in's `StandIn`."""
  if isinstance(difficulty, standin.StandIn):
    return difficulty
  if difficulty not in DIFFICULTIES:
    raise ValueError(f'--difficulty={difficulty}: must be one of {", ".join(DIFFICULTIES)}')
  return None if difficulty == 'demo' else standin.StandIn()


def make_dataset(out_dir, num_train=6000, num_test=1000, seed=0, overwrite=False,
                 show_progress=True, workers=None, exist_ok=False, difficulty='demo'):
  """Writes a synthetic PCam set in Kaggle's layout: train/, train_labels.csv, test/, sample_submission.csv.

  The patches are 96x96 RGB TIFFs named <40-hex id>.tif, as Kaggle's, with
  a label that depends only on the center 32x32 (see the module docstring).

  Example:

    import pcam_tfdata as pt
    pt.make_synthetic('demo_kaggle', num_train=2000, num_test=200)
    pt.make_records('demo_kaggle', 'demo_records', per_class=800)
    # As hard as PCam, from slides of 2 centres (see standin.py):
    pt.make_synthetic('standin', num_train=24000, difficulty='pcam')
    pt.make_records('standin', 'standin_records', groups_csv='standin/slides.csv')

  The folder appears only when complete: it is written under a temporary
  name and renamed at the end.

  Args:
    out_dir: the folder to create.
    num_train, num_test: patches per folder.
    seed: the set is a function of (num_train, num_test, seed, difficulty).
    overwrite: replace an existing folder.
    show_progress: show a progress bar (a line every 30 s in a log file).
    workers: processes drawing patches (default: all cores); the set is
      byte-identical for any number.
    exist_ok: an existing folder is left as it is (the demo's: made by
      an earlier or a concurrent first run).
    difficulty: 'demo' (every model solves it), 'pcam' (the stand-in with
      its default knobs, plus `slides.csv`, `centres.csv` and
      `test_labels.csv`), or a
      `standin.StandIn` with knobs of one's own.

  Returns:
    The folder's path.

  Raises:
    ValueError: bad sizes or difficulty, or `out_dir` exists and not
      `overwrite`; folderlock.FolderBusy: another process writes it.
  """
  params = _as_params(difficulty)
  if num_train < 2 or num_test < 0:
    raise ValueError(f'--num_train={num_train} must be >= 2 and --num_test={num_test} >= 0')
  with outdir.lock(out_dir, what=out_dir):  # (Two first runs of the demo at once.)
    if exist_ok and os.path.isdir(out_dir):
      return out_dir
    return _make_dataset(out_dir, num_train, num_test, seed, overwrite, show_progress, workers,
                         params)


def _draw_split(code, folder, labels, seed, params, first_slide):
  """(items, id/label frame, slide rows) of one split; slides are numbered from `first_slide`."""
  difficulty = 'demo' if params is None else 'pcam'
  ids = [example_id(seed, folder, i, difficulty) for i in range(len(labels))]
  frame = pd.DataFrame({'id': ids, 'label': labels})
  if params is None:
    return [(code, i, int(l), n, None, i) for i, (l, n) in enumerate(zip(labels, ids))], frame, None
  slide_of, slides = standin.assign_slides(labels, params, seed, first_slide)
  # Kaggle's test patches carry no duplicates of each other to draw on.
  share = params.duplicates if code == 1 else 0.0
  source = standin.pick_duplicates(labels, slide_of, share, seed)
  info = {index: (index, centre, tumour) for index, centre, tumour in slides}
  items = [(code, i, int(labels[i]), ids[i], info[slide_of[i]], int(source[i]))
           for i in range(len(labels))]
  names = {index: standin.slide_name(index, centre, tumour) for index, centre, tumour in slides}
  rows = pd.DataFrame({'id': ids, 'wsi': [names[k] for k in slide_of],
                       'centre': [f'centre{info[k][1]}' for k in slide_of]})
  return items, frame, rows


def _make_dataset(out_dir, num_train, num_test, seed, overwrite, show_progress, workers, params):
  if os.path.lexists(out_dir) and not overwrite:
    raise ValueError(f'--out_dir={out_dir}: exists; pass --overwrite to replace it')
  tmp = out_dir.rstrip('/') + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  jobs, frames, slide_rows = [], [], []
  first_slide = 0
  # Test labels are drawn too, so test patches look like train ones, but not written;
  # test patches come from slides of their own, as Kaggle's do.
  for code, folder, labels in ((1, kaggle.TRAIN_DIR, _labels(num_train, seed)),
                               (2, kaggle.TEST_DIR, _labels(num_test, seed + 1))):
    os.makedirs(os.path.join(tmp, folder))
    items, frame, rows = _draw_split(code, folder, labels, seed, params, first_slide)
    frames.append(frame)
    if rows is not None:
      slide_rows.append(rows)
      first_slide = max(item[4][0] for item in items) + 1 if items else first_slide
    jobs += [(os.path.join(tmp, folder), seed, params, items[k:k + 256])
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
  if slide_rows:
    # The stand-in knows what Kaggle keeps to itself: the test patches' labels.
    frames[1].to_csv(os.path.join(tmp, TEST_LABELS_CSV), index=False)
    rows = pd.concat(slide_rows, ignore_index=True)
    rows[['id', 'wsi']].to_csv(os.path.join(tmp, SLIDES_CSV), index=False)
    rows[['id', 'centre']].to_csv(os.path.join(tmp, CENTRES_CSV), index=False)
  if os.path.lexists(out_dir):
    shutil.rmtree(out_dir)
  os.rename(tmp, out_dir)
  return out_dir
