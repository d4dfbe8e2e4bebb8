"""Augmentations: pure functions of a batch (and a stateless seed), vectorized.

A patch's label is about its centre, and tissue has no orientation, so each
of the 8 symmetries of the square (the dihedral group: 4 rotations, each with
or without a flip) gives an equally valid training image.
"""

import dataclasses

import numpy as np
import tensorflow as tf

NUM_DIHEDRAL = 8
# Memory the 8 dihedral variants of a pipeline's cached split may take: the
# seed's 80,000 train patches at 32x32 take 1.8 GiB (at 96x96: 16.5 GiB).
DEFAULT_VARIANT_BUDGET = 4 << 30


@dataclasses.dataclass(frozen=True)
class Augment:
  """What a training pipeline does to each image, and where.

  Example (`augment=True` means the dihedral transform alone):

    import pcam_tfdata as pt
    ds = pt.make_dataset('records/demo', 'train', batch_size=64, training=True, seed=0,
                         augment=pt.Augment(dihedral=True, stain_jitter=0.02))

  Attributes:
    dihedral: one of the 8 flips and 90-degree rotations per image, uniform
      and independent (`draw_dihedral_ids`).
    dihedral_on_device: with `dihedral`, the pipeline yields each batch's
      transform ids (int32 [B]) as 'dihedral' of a dict after the labels
      (and ids) instead of applying them, and the training step applies
      them on its device (`apply_dihedral_ids`): bit-identical images
      either way (the maps only move pixels). The split is then never held
      8 times: a batch costs the host one gather, as without augmentation.
      For pcam_tfdata's training step: with Keras `fit`, augment on the host.
    stain_jitter: s in [0, 1): each image's haematoxylin, eosin and DAB
      concentrations scaled by U(1-s, 1+s) and shifted by U(-s, s)
      (`stain_jitter`); 0 for none.
    stain_on_device: with `stain_jitter`, the pipeline yields each batch's
      stain maps (float32 [B, 4, 3], `stain_transform`) as 'stain' of that
      dict instead of applying them, and the training step applies them on
      its device (`apply_stain`): bit-identical images either way.
    variant_budget: with `dihedral`, bytes the 8 variants of an input
      pipeline's cached split may take, so that a batch is one gather;
      over it each batch is transformed after its gather (the same batches).
  """
  dihedral: bool = False
  stain_jitter: float = 0.0
  stain_on_device: bool = False
  variant_budget: int = DEFAULT_VARIANT_BUDGET
  dihedral_on_device: bool = False

  def __post_init__(self):
    if not 0 <= self.stain_jitter < 1:
      raise ValueError(f'stain_jitter={self.stain_jitter}: must be in [0, 1)')
    if self.stain_on_device and not self.stain_jitter:
      raise ValueError('stain_on_device=True needs stain_jitter > 0')
    if self.dihedral_on_device and not self.dihedral:
      raise ValueError('dihedral_on_device=True needs dihedral=True')
    if self.variant_budget < 0:
      raise ValueError(f'variant_budget={self.variant_budget}: must be >= 0')

  @classmethod
  def of(cls, augment):
    """An Augment from None/False (none), True or 'dihedral' (dihedral only), or itself."""
    if isinstance(augment, cls):
      return augment
    if augment in (None, False):
      return cls()
    if augment is True or augment == 'dihedral':
      return cls(dihedral=True)
    raise ValueError(f'augment={augment!r}: use None, False, True, "dihedral" or an Augment')

  def __bool__(self):
    return self.dihedral or bool(self.stain_jitter)


def dihedral_permutations(size):
  """[8, size*size] int32: pixel index maps of the 8 symmetries of a square.

  Row t sends output pixel p to input pixel table[t, p]: transforms 0-3 rotate
  by 0/90/180/270 degrees counterclockwise (`np.rot90`), 4-7 do the same after
  a left-right flip. The reference that `dihedral_transform` is tested against.
  """
  grid = np.arange(size * size, dtype=np.int32).reshape(size, size)
  table = [np.rot90(g, k).reshape(-1) for g in (grid, grid[:, ::-1]) for k in range(4)]
  return np.stack(table)


def _transpose(x):
  """Swaps the rows and columns of a batch [B, H, W, C].

  Not tf.transpose on uint8: in a graph, TensorFlow's oneDNN pass then logs
  an error record ("oneDNN supports DT_UINT8 only on platforms with
  AVX-512", measured on an AVX-512 EPYC too) on the user's terminal. One
  gather over the flattened pixels makes the same permutation without it
  (measured: 1.3x the transpose's time for the op alone).
  """
  h, w, c = x.shape[1:]
  if x.dtype != tf.uint8 or None in (h, w, c):  # (The gather needs the static size.)
    return tf.transpose(x, [0, 2, 1, 3])
  index = np.arange(h * w, dtype=np.int32).reshape(h, w).T.reshape(-1)
  return tf.reshape(tf.gather(tf.reshape(x, [-1, h * w, c]), index, axis=1), [-1, w, h, c])


_flip_rows = lambda x: tf.reverse(x, [1])
_flip_cols = lambda x: tf.reverse(x, [2])
_flip_both = lambda x: tf.reverse(x, [1, 2])
# Each transform in the fewest whole-batch ops (row flips are the cheap ones).
_DIHEDRAL = (
    lambda x: x,
    lambda x: _flip_rows(_transpose(x)),  # rot90
    _flip_both,  # rot180
    lambda x: _flip_cols(_transpose(x)),  # rot270
    _flip_cols,  # flip
    _transpose,  # rot90 of flip
    _flip_rows,  # rot180 of flip
    lambda x: _flip_both(_transpose(x)),  # rot270 of flip
)


def dihedral_transform(images, k):
  """Applies dihedral transform k (0..7, see `dihedral_permutations`) to a batch.

  Args:
    images: [B, S, S, C] tensor.
    k: Python int in 0..7, the same for the whole batch (e.g. each pass of
      test-time augmentation).
  """
  return _DIHEDRAL[k](images)


def dihedral_variants(images, out):
  """Writes the 8 dihedral transforms of a whole split into `out`, in NumPy.

  Args:
    images: uint8 [N, S, S, C].
    out: [8, N, S, S, C] array; out[t] becomes `dihedral_transform(images, t)`.
  """
  for t in range(NUM_DIHEDRAL):
    source = images if t < 4 else images[:, :, ::-1]  # As `dihedral_permutations`.
    out[t] = np.rot90(source, t % 4, axes=(1, 2))


def draw_dihedral_ids(shape, seed):
  """The transform (0..7) of each image: uniform and independent.

  Args:
    shape: of the draws, e.g. [batch] or [steps, batch] (ints or a tensor).
    seed: [2] int tensor, a stateless seed (`tf.random.stateless_*`).

  Returns:
    int32 tensor of `shape`.
  """
  return tf.random.stateless_uniform(shape, seed, minval=0, maxval=NUM_DIHEDRAL, dtype=tf.int32)


def group_dihedral(transforms):
  """Groups a batch's positions by their transform, for `apply_dihedral`.

  The images are then transformed in groups, one per transform, each group
  with a few static whole-slice ops: the draws decide the group sizes, so
  every batch size (even 1 or 4) draws from all 8, unlike a fixed B/8
  images per transform.

  Args:
    transforms: int32 [B], each position's transform (`draw_dihedral_ids`).

  Returns:
    (order, bounds): `order` [B] int32 lists the positions grouped by
    transform; positions order[bounds[k]:bounds[k+1]] get transform k.
    `bounds` is [9] int32.
  """
  order = tf.argsort(transforms, stable=True)
  # bounds[k]: the positions whose transform is below k. A count of
  # comparisons, not tf.math.bincount and a cumsum: the training step runs
  # this on the accelerator (`apply_dihedral_ids`), and under op determinism
  # (--seed on GPUs) TensorFlow refuses DenseBincount's GPU kernel.
  below = transforms[None, :] < tf.range(NUM_DIHEDRAL + 1, dtype=transforms.dtype)[:, None]
  return order, tf.reduce_sum(tf.cast(below, tf.int32), 1)


def apply_dihedral(grouped, order, bounds):
  """Transforms images grouped by `group_dihedral` and puts each back in its position.

  Args:
    grouped: [B, S, S, C], the batch's images in `order` (images[order]); the
      training pipeline gathers them so from the cached split directly.
    order, bounds: from `group_dihedral`.

  Returns:
    [B, S, S, C]: position order[j] holds image j with its transform. One
    stitch puts the groups back in place (no more copies than a concat):
    a position's transform is independent of where it sits in the batch, so
    the replicas that split the batch see the same mix.
  """
  positions, parts = [], []
  for k in range(NUM_DIHEDRAL):
    positions.append(order[bounds[k]:bounds[k + 1]])
    parts.append(_DIHEDRAL[k](grouped[bounds[k]:bounds[k + 1]]))
  out = tf.dynamic_stitch(positions, parts)
  out.set_shape(grouped.shape)  # Dynamic slices lose the static batch size.
  return out


def apply_dihedral_ids(images, transforms):
  """Image i of a batch with dihedral transform transforms[i], still at position i.

  What the training step does with the ids the pipeline yields under
  `Augment.dihedral_on_device`: the same ops as the pipeline's own path
  (`apply_dihedral`), on the replica's share of the batch.

  Args:
    images: [B, S, S, C].
    transforms: int [B], each in 0..7 (`draw_dihedral_ids`).
  """
  order, bounds = group_dihedral(tf.cast(transforms, tf.int32))
  return apply_dihedral(tf.gather(images, order), order, bounds)


def random_dihedral(images, seed):
  """A uniform, independent dihedral transform for each image of a batch.

  Args:
    images: [B, S, S, C].
    seed: [2] int stateless seed; the same seed gives the same transforms.

  Returns:
    [B, S, S, C]: image i transformed, still at position i (labels and ids
    need no change).
  """
  return apply_dihedral_ids(images, draw_dihedral_ids([tf.shape(images)[0]], seed))


# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB optical
# densities per R, G, B), as skimage.color.rgb_from_hed. HED here is
# skimage's rgb2hed: optical density log(max(rgb, 1e-6)) / log(1e-6) times
# HED_FROM_RGB, except that negative concentrations are kept (skimage clips
# them at 0), so that the jitter is affine in HED and alpha 1, beta 0 gives
# back the image.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]], np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_LOG_FLOOR = np.log(1e-6)  # skimage's log_adjust: intensities floored at 1e-6.
_FLOOR_255 = 255e-6  # The same floor on 0..255 values.


def draw_stain(batch_size, strength, seed):
  """Per image and stain, (alpha, beta) of `stain_jitter`: float32 [batch_size, 2, 3]."""
  alpha_key, beta_key = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  alpha = tf.random.stateless_uniform([batch_size, 3], alpha_key, 1 - strength, 1 + strength)
  beta = tf.random.stateless_uniform([batch_size, 3], beta_key, -strength, strength)
  return tf.stack([alpha, beta], 1)


def stain_transform(draws):
  """What `apply_stain` applies for draws (alpha, beta) [B, 2, 3]: float32 [B, 4, 3].

  The jitter c -> alpha * c + beta is affine in HED, and HED is linear in
  optical density, so per image it is one affine map of the log of the
  pixel values: with L = log(max(v, 255e-6)) for v in 0..255 (skimage's
  1e-6 floor on v / 255), the jittered v' = exp(L @ A + c), where

    A = HED_FROM_RGB diag(alpha) RGB_FROM_HED,
    c = log(1e-6) * beta @ RGB_FROM_HED + log(255) * (1 - column sums of A).

  Rows 0-2 of the result hold A, row 3 holds c; computed in float64.

  Why a map per image rather than the two conversions: every constant of
  the formula is folded in here, once per batch, so that `apply_stain`
  holds none that a compiler could combine. Grappler's constant folding
  runs on a training step's graph but not on tf.data's functions, and it
  rounded the same formula differently on the two paths (58 of 4.9M
  values per epoch a level apart): with the map made here for both paths,
  the pipeline and the step compute bit-identical images.
  """
  draws = tf.cast(draws, tf.float64)
  alpha, beta = draws[:, 0], draws[:, 1]
  hed_from_rgb = tf.constant(HED_FROM_RGB, tf.float64)
  rgb_from_hed = tf.constant(RGB_FROM_HED, tf.float64)
  a = tf.einsum('ij,bj,jk->bik', hed_from_rgb, alpha, rgb_from_hed)
  log255 = np.log(255.0)
  c = _LOG_FLOOR * tf.matmul(beta, rgb_from_hed) + log255 * (1 - tf.reduce_sum(a, 1))
  return tf.cast(tf.concat([a, c[:, None]], 1), tf.float32)


def apply_stain(images, transform):
  """uint8 images [B, H, W, 3] with each image's `stain_transform` [B, 4, 3] applied.

  Elementwise ops on tensors only (no constant but the floor and the
  clip), each rounded once in float32, so the result is the same in a
  tf.data function and in a compiled training step (`stain_transform`).
  """
  log = tf.math.log(tf.maximum(tf.cast(images, tf.float32), _FLOOR_255))
  t = transform[:, None, None]  # [B, 1, 1, 4, 3]
  out = log[..., 0:1] * t[..., 0, :] + log[..., 1:2] * t[..., 1, :]
  out = out + log[..., 2:3] * t[..., 2, :] + t[..., 3, :]
  return tf.cast(tf.round(tf.clip_by_value(tf.exp(out), 0.0, 255.0)), tf.uint8)


def stain_jitter(images, strength, seed):
  """Perturbs each image's haematoxylin, eosin and DAB concentrations (Tellez et al. 2019).

  Per image and stain channel: c -> alpha * c + beta, alpha ~ U(1 - s, 1 + s),
  beta ~ U(-s, s), in HED (skimage's rgb2hed, unclipped: see RGB_FROM_HED), back to RGB,
  rounded to uint8. The colour variation between labs and scanners, drawn
  afresh for every image.

  Args:
    images: uint8 [B, H, W, 3].
    strength: s in [0, 1); 0 returns the images unchanged.
    seed: [2] int stateless seed.

  Returns:
    uint8 [B, H, W, 3].
  """
  if not strength:
    return images
  return apply_stain(images, stain_transform(draw_stain(tf.shape(images)[0], strength, seed)))
