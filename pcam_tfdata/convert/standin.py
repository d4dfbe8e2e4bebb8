"""A synthetic set as hard as PCam: slides, centres, stain and scanner, context, label noise.

`synthetic.make_dataset(..., difficulty='pcam')` draws its patches here. Each
property of the real data that decides a modelling question is a field of
`StandIn`, with the property of PCam it stands for:

  centres            Camelyon16's slides come from 2 centres (Radboud UMC,
                     UMC Utrecht; Camelyon17 has 5). Default 2.
  patches_per_slide  PCam: 327,680 patches from 400 slides, about 820 each.
                     Default 800 (at least 5 slides per centre for a small set).
  centre_stain       Centres differ in H&E stain (optical-density vectors and
                     concentrations): log-scale spread of the concentrations,
                     and the stain vectors turn by a third of it. Default 0.25.
  slide_stain        Each slide varies around its centre, as stain batches and
                     section thickness do. Default 0.08.
  centre_tint        Centres differ in how much stain the whole section takes up
                     (staining protocol, mounting): an optical density of
                     haematoxylin and of eosin added to every pixel of tissue,
                     drawn per centre (standard deviation, concentration
                     units). Default 0.32: with it a network trained on one
                     centre ranks the other's patches erratically from seed
                     to seed, and stain jitter steadies it (BUILD.md).
  scanner            Scanners differ in sharpness (blur), noise and white
                     point; 1 is the default spread, 0 one scanner everywhere.
  context            Tumour is spatially coherent: the share of negatives drawn
                     beside a tumour (tumour in the outer ring, not in the
                     center). Positives mostly sit in or at the edge of a
                     tumour, so the ring carries evidence the 32x32 crop does
                     not see (a Kaggle ablation with one network: 32 px crop
                     0.89, full 96 px patch 0.95 private AUC). Default 0.2.
  sheet              Share of positives inside a tumour sheet that covers the
                     whole patch; the rest sit at a tumour's edge. Default 0.45.
  faint_foci         Share of positives that are a small, faint (low-grade)
                     tumour focus touching the center. Default 0.1.
  mimics             Share of patches of either class with a tumour mimic
                     (reactive cells, histiocytes, germinal centres: large
                     pale nuclei whose grade overlaps low-grade tumour's).
                     Default 0.35.
  annotation_margin  Labels come from coarse polygons (Camelyon16's
                     annotations): each tumour's annotated edge lies this many
                     pixels (standard deviation) outside or inside its true
                     edge, so patches whose center a tumour just misses or
                     just touches can carry the wrong label (the margin is
                     drawn with each tumour's outline; draws that fit the
                     label are kept). Default 3.
  duplicates         Share of train patches (up to 0.5) that are pixel copies
                     of another patch of the same slide and label (PCam's
                     original release has duplicates; Kaggle's copy removed
                     them; the share here is not a measured PCam figure).
                     Default 0.01.

The label is a function of the center 32x32 alone (of the annotation there):
tumour in the ring changes how likely tumour in the center is, never the
label. Slide and centre parameters are drawn from (seed, slide) and each
patch from (seed, split, index), so a set is the same however many
processes draw it.
"""

import dataclasses
import functools

import numpy as np

SIZE = 96
_CENTER = slice(32, 64)  # Rows/cols of the center 32x32 that decides the label.

# Haematoxylin and eosin optical-density vectors (R, G, B) of scanned H&E: the
# reference of Macenko et al.'s stain normalization, estimated on real slides
# (Ruifrok & Johnston's, measured on single stains, give too little blue).
_H = np.array([0.5626, 0.7201, 0.4062])
_E = np.array([0.2159, 0.8012, 0.5581])
_TUMOUR_GRADE = (0.3, 1.0)  # Nuclear atypia of tumour regions; faint foci take its low end.
_MIMIC_GRADE = (0.1, 0.6)


# One line per knob, for flags and tables; the module docstring says more.
HELP = {
    'centres': 'Centres the slides come from (Camelyon16: 2; Camelyon17: 5).',
    'patches_per_slide': 'Patches per slide (PCam: about 820); at least 5 slides per centre.',
    'centre_stain': 'Spread of H&E stain between centres (log scale of concentrations).',
    'slide_stain': 'Spread of stain between slides of one centre.',
    'centre_tint': 'Spread between centres of the stain the whole section takes up (additive).',
    'scanner': "Spread of the centres' scanners: blur, noise, white point (0: one scanner).",
    'context': 'Share of negatives drawn beside a tumour (tumour in the ring only).',
    'sheet': 'Share of positives inside a tumour sheet covering the patch.',
    'faint_foci': 'Share of positives that are a small, faint tumour focus touching the center.',
    'mimics': 'Share of patches (either class) with tumour-mimicking cells.',
    'annotation_margin': "Std (pixels) of the annotation's edge about the tumour's: label noise.",
    'duplicates': 'Share of train patches that copy another patch of their slide and label.',
}


@dataclasses.dataclass(frozen=True)
class StandIn:
  """The stand-in's knobs; the module docstring says what on real PCam each stands for.

  Example (five centres, as Camelyon17, and no label noise):

    import pcam_tfdata as pt
    pt.make_synthetic('standin5', num_train=24000,
                      difficulty=pt.StandIn(centres=5, annotation_margin=0))
    pt.make_records('standin5', 'records/standin5', per_class=9000,
                    groups_csv='standin5/centres.csv', num_folds=5, fold=0)
  """
  centres: int = 2
  patches_per_slide: int = 800
  centre_stain: float = 0.25
  slide_stain: float = 0.08
  centre_tint: float = 0.32
  scanner: float = 1.0
  context: float = 0.2
  sheet: float = 0.45
  faint_foci: float = 0.1
  mimics: float = 0.35
  annotation_margin: float = 3.0
  duplicates: float = 0.01

  def __post_init__(self):
    for name in ('centres', 'patches_per_slide'):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{name}={value!r}: must be a whole number >= 1')
    # `not lo <= x <= hi` (rather than `x < lo or x > hi`) refuses NaN too.
    for name, high in (('context', 1), ('sheet', 1), ('faint_foci', 1), ('mimics', 1),
                       ('duplicates', 0.5)):
      if not 0 <= getattr(self, name) <= high:
        raise ValueError(f'{name}={getattr(self, name)}: must be in [0, {high}]')
    if self.sheet + self.faint_foci > 1:
      raise ValueError(f'sheet={self.sheet} + faint_foci={self.faint_foci}: must be <= 1')
    for name in ('centre_stain', 'slide_stain', 'scanner', 'annotation_margin', 'centre_tint'):
      if not 0 <= getattr(self, name) < float('inf'):
        raise ValueError(f'{name}={getattr(self, name)}: must be finite and >= 0')


@dataclasses.dataclass(frozen=True)
class Slide:
  """One slide's draw: its centre's stain and scanner, varied for the slide."""
  name: str
  centre: int
  tumour: bool
  stain: np.ndarray  # [2, 3]: haematoxylin and eosin optical density per unit concentration.
  white: np.ndarray  # [3]: the scanner's white point.
  blur: float  # Gaussian sigma, pixels.
  noise: float  # Sensor noise, standard deviation in 0..255.
  tint: np.ndarray  # [2]: haematoxylin and eosin the centre's sections take up everywhere.


def _unit(v):
  return v / np.linalg.norm(v)


@functools.lru_cache(maxsize=64)
def _centre(params, seed, centre):
  """(stain [2, 3], white [3], blur, noise, tint [2]) of a centre."""
  rng = np.random.default_rng([seed, 10, centre])
  s = params.centre_stain
  # Optical densities stay positive: a stain absorbs, it never adds light.
  stain = np.stack([_unit(np.maximum(v + rng.normal(0, s / 3, 3), 0.02)) * np.exp(rng.normal(0, s))
                    for v in (_H, _E)])
  scan = params.scanner
  white = 252 - rng.uniform(0, 14 * scan, 3)
  blur, noise = 0.5 + rng.uniform(0, 0.7) * scan, 2 + rng.uniform(0, 3) * scan
  return stain, white, blur, noise, rng.normal(0, params.centre_tint, 2)


def slide_name(index, centre, tumour):
  """As Camelyon's: 'centre1_tumor_007' (the community's file says 'camelyon16_train_tumor_007')."""
  return f'centre{centre}_{"tumor" if tumour else "normal"}_{index:03d}'


def make_slide(params, seed, index, centre, tumour):
  """The slide `index` of a set, drawn around its centre's stain and scanner."""
  stain, white, blur, noise, tint = _centre(params, seed, centre)
  rng = np.random.default_rng([seed, 11, index])
  stain = stain * np.exp(rng.normal(0, params.slide_stain, (2, 1)))
  return Slide(slide_name(index, centre, tumour), centre, tumour, stain,
               np.clip(white + rng.normal(0, 2 * params.scanner, 3), 200, 255),
               blur * np.exp(rng.normal(0, 0.1 * params.scanner)), noise, tint)


def assign_slides(labels, params, seed, first_slide=0):
  """Deals patches to slides: negatives over every slide, positives over tumour slides.

  Slide k sits in centre k % centres and is a tumour slide when
  (k // centres) is odd, so every centre has both kinds (given enough slides).

  Returns:
    (slide index per patch, [(index, centre, tumour)] per slide).
  """
  num = len(labels)
  count = max(5 * params.centres, int(round(num / params.patches_per_slide)))
  count += count % 2  # An even count (every set measured in BUILD.md was drawn so).
  slides = [(first_slide + k, k % params.centres, (k // params.centres) % 2 == 1)
            for k in range(count)]
  tumour_slides = np.array([k for k, (_, _, t) in enumerate(slides) if t])
  rng = np.random.default_rng([seed, 13, first_slide])
  of = np.empty(num, np.int64)
  for label, pool in ((0, np.arange(count)), (1, tumour_slides)):
    where = np.flatnonzero(labels == label)
    of[where] = rng.permutation(np.resize(pool, len(where)))
  return of + first_slide, slides


def pick_duplicates(labels, slide_of, share, seed):
  """Source index per patch: itself, or for a `share` of them another patch of its slide and label.

  A copy's source is never itself a copy. A copy whose slide holds no
  original of its label stays an original (only with tiny slides).
  """
  source = np.arange(len(labels))
  rng = np.random.default_rng([seed, 12])
  count = int(round(share * len(labels)))
  copies = rng.choice(len(labels), size=count, replace=False) if count else []
  originals = np.setdiff1d(source, copies)
  by_group = {}  # (slide, label) -> its originals, in index order.
  for i in originals:
    by_group.setdefault((slide_of[i], labels[i]), []).append(i)
  for i in copies:
    same = by_group.get((slide_of[i], labels[i]), [])
    if same:
      source[i] = same[rng.integers(len(same))]
  return source


def smooth_noise(rng, cells):
  """Zero-mean noise on a coarse grid, bilinearly upsampled to SIZE x SIZE."""
  grid = rng.standard_normal((cells + 1, cells + 1))
  x = np.linspace(0, cells, SIZE)
  i = np.minimum(x.astype(int), cells - 1)
  f = x - i
  rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
  return rows[:, i] * (1 - f) + rows[:, i + 1] * f


@functools.lru_cache(maxsize=1)
def _grid():
  return np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5


def _blob(rng, center, radius):
  """Signed distance (pixels, negative inside) to a region with a wavy edge."""
  y, x = _grid()
  wave = 0.15 * radius * smooth_noise(rng, 3)
  return np.hypot(y - center[0], x - center[1]) - radius + wave


def _at_distance(rng, distance):
  """A point `distance` from the patch's middle, in a random direction."""
  angle = rng.uniform(0, 2 * np.pi)
  return 48 + distance * np.sin(angle), 48 + distance * np.cos(angle)


def draw_tumour(rng, label, params):
  """Where tumour is, given the label: (signed distance map or None, grade, annotation margin).

  The annotation (the label's source) is the region grown by `margin`
  pixels; a draw is kept when the annotation touches the center exactly
  when `label` is 1, so the true tissue can disagree with the label near an
  edge. Negatives beside a tumour (`context`) show it in the ring only.
  """
  if not label and rng.random() >= params.context:
    return None, 0.0, 0.0
  grade = rng.uniform(*_TUMOUR_GRADE)
  u = rng.random()
  for _ in range(1000):
    margin = rng.normal(0, params.annotation_margin)  # This tumour's annotation.
    if label and u < params.sheet:
      sdf = _blob(rng, rng.uniform(40, 56, 2), rng.uniform(80, 140))
    elif label and u < params.sheet + params.faint_foci:
      radius = rng.uniform(3, 7)
      sdf = _blob(rng, _at_distance(rng, radius + rng.uniform(8, 22)), radius)
      grade = rng.uniform(_TUMOUR_GRADE[0], _TUMOUR_GRADE[0] + 0.2)
    elif label:
      radius = rng.uniform(20, 90)
      sdf = _blob(rng, _at_distance(rng, radius + rng.uniform(-12, 20)), radius)
    else:
      radius = rng.uniform(12, 70)
      sdf = _blob(rng, _at_distance(rng, radius + rng.uniform(18, 50)), radius)
    touches = sdf[_CENTER, _CENTER].min() < margin
    if touches == bool(label) and sdf.min() < 0:
      return sdf, grade, margin
  raise AssertionError('no tumour geometry fits the label')  # Not reached with these ranges.


def _nuclei(h, e, centers, radius, density, cytoplasm=0.0, rim=0.0):
  """Blends soft-edged nuclei (haematoxylin) with a cytoplasm halo (eosin) into h, e.

  `rim` > 0 pales the inside against the membrane: vesicular chromatin.
  """
  for (cy, cx), (ry, rx), d in zip(centers, radius, density):
    reach = max(ry, rx) * 1.6 + 1
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, SIZE)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, SIZE)
    if y0 >= y1 or x0 >= x1:
      continue
    yy, xx = np.ogrid[y0:y1, x0:x1]
    r2 = ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2
    core = np.clip((1.0 - r2) * 2.5, 0.0, 1.0)
    shade = d * (1 - rim + rim * np.minimum(r2, 1.0)) if rim else d
    np.maximum(h[y0:y1, x0:x1], core * shade, out=h[y0:y1, x0:x1])
    if cytoplasm:
      e[y0:y1, x0:x1] += cytoplasm * np.clip(2.6 - r2, 0.0, 1.0) * (1 - core)


def _cells(rng, inside, per_pixel):
  """Random cell centres at `per_pixel` density where `inside` (bool [SIZE, SIZE])."""
  points = rng.uniform(0, SIZE, (rng.poisson(per_pixel * SIZE * SIZE), 2))
  return points[inside[points[:, 0].astype(int), points[:, 1].astype(int)]]


def _atypical(h, e, rng, inside, grade, show=None):
  """Cells of nuclear atypia `grade` in 0..1: larger, paler, vesicular, more varied nuclei, more cytoplasm.

  `show`: where at least one cell must sit when any pixel of it is inside
  (a tumour the label puts in the center shows a nucleus there, however
  small the sliver); drawn only when the random cells missed it, so every
  other patch is drawn as without it.
  """
  centers = _cells(rng, inside, 0.016 - 0.008 * grade)
  if show is not None and show.any() and not show[tuple(centers.astype(int).T)].any():
    pixels = np.argwhere(show)
    centers = np.vstack([centers, pixels[rng.integers(len(pixels))] + rng.uniform(0, 1, 2)])
  n = len(centers)
  size = (2.0 + 3.0 * grade) * rng.uniform(1 - 0.3 * grade, 1 + 0.3 * grade, (n, 2))
  _nuclei(h, e, centers, size, (1.7 - 0.45 * grade) * rng.uniform(0.85, 1.1, n),
          cytoplasm=0.12 + 0.15 * grade, rim=0.5 * grade)
  if grade > 0.45:  # Nucleoli: a dark dot in the larger nuclei.
    keep = rng.random(n) < grade
    _nuclei(h, e, centers[keep], np.full((keep.sum(), 2), 0.9), np.full(keep.sum(), 1.7))


@dataclasses.dataclass(frozen=True)
class Tissue:
  """What a patch shows, before stain and scanner: the truth its label approximates."""
  tumour: np.ndarray  # bool [SIZE, SIZE].
  grade: float  # The tumour's nuclear atypia, 0..1.
  mimic: np.ndarray  # bool [SIZE, SIZE]: tumour-mimicking cells.
  mimic_grade: float
  margin: float  # The annotation's edge, pixels outside the tumour's (negative: inside).


def draw_tissue(rng, label, params):
  """The tissue of a patch labelled `label` (the first draws of `make_patch` from `rng`)."""
  sdf, grade, margin = draw_tumour(rng, label, params)
  tumour = np.zeros((SIZE, SIZE), bool) if sdf is None else sdf < 0
  mimic, mimic_grade = np.zeros((SIZE, SIZE), bool), 0.0
  if rng.random() < params.mimics:
    mimic = (_blob(rng, rng.uniform(8, 88, 2), rng.uniform(10, 34)) < 0) & ~tumour
    mimic_grade = rng.uniform(*_MIMIC_GRADE)
  return Tissue(tumour, grade, mimic, mimic_grade, margin)


def make_patch(rng, label, slide, params):
  """One patch of `slide`, uint8 [96, 96, 3]; its label decided by the center 32x32."""
  tissue = draw_tissue(rng, label, params)
  tumour, mimic = tissue.tumour, tissue.mimic

  # Stroma (eosin) with fibres and a few empty lumens (fat, vessels).
  e = 0.45 * (1 + 0.3 * smooth_noise(rng, 6)) * (1 + 0.2 * smooth_noise(rng, 18))
  h = 0.12 * (1 + 0.3 * smooth_noise(rng, 12))  # Out-of-focus and cytoplasmic haematoxylin.
  # Lymphocytes: small, round, dark and dense, wherever neither tumour nor mimic is.
  normal = ~tumour & ~mimic
  centers = _cells(rng, normal, rng.uniform(0.012, 0.03))
  n = len(centers)
  _nuclei(h, e, centers, rng.uniform(1.5, 2.4, (n, 1)) * rng.uniform(0.9, 1.1, (n, 2)),
          rng.uniform(1.7, 2.3, n))
  if mimic.any():
    _atypical(h, e, rng, mimic, tissue.mimic_grade)
  if tumour.any():
    center = np.zeros((SIZE, SIZE), bool)
    center[_CENTER, _CENTER] = True
    _atypical(h, e, rng, tumour, tissue.grade, show=tumour & center)
  # The centre's tint, on tissue only (the holes below stay empty); a
  # negative tint pales the tissue, never below no stain.
  h, e = np.maximum(h + slide.tint[0], 0), np.maximum(e + slide.tint[1], 0)
  # Fat and vessels: empty space, never inside a tumour (so it hides none).
  hole = np.clip(smooth_noise(rng, 3) - rng.uniform(0.6, 2.0), 0, 0.5) * 2 * ~tumour
  h, e = h * (1 - hole), e * (1 - hole)

  density = h[..., None] * slide.stain[0] + e[..., None] * slide.stain[1]
  image = slide.white * np.exp(-density)
  image = _blur(image, slide.blur) + rng.normal(0, slide.noise, image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _blur(image, sigma):
  """Separable Gaussian blur with edge padding: the scanner's optics."""
  radius = int(np.ceil(3 * sigma))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps /= taps.sum()
  padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode='edge')
  rows = sum(t * padded[k:k + SIZE] for k, t in enumerate(taps))
  return sum(t * rows[:, k:k + SIZE] for k, t in enumerate(taps))
