"""The stand-in as hard as PCam: each knob has the effect its docstring claims."""

import dataclasses
import hashlib
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import pcam_tfdata as pt
from pcam_tfdata.convert import kaggle
from pcam_tfdata.convert import standin
from pcam_tfdata.convert import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = standin.StandIn()


def _tool(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'make_synthetic.py'), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)


def _digest(folder):
  """{relative path: sha256} of every file under `folder`."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_the_set_is_byte_identical_whatever_the_workers(tmp_path):
  """The bar: same seed, same files, with 1 or 2 drawing processes (--workers)."""
  digests = []
  for workers in (1, 2):
    out = tmp_path / f'w{workers}'
    proc = _tool(f'--out_dir={out}', '--num_train=300', '--num_test=20', '--difficulty=pcam',
                 f'--workers={workers}', '--duplicates=0.05', '--seed=4')
    assert proc.returncode == 0, proc.stderr
    assert 'slides.csv and centres.csv' in proc.stdout
    digests.append(_digest(out))
  assert digests[0] == digests[1]
  names = set(digests[0])
  assert {'train_labels.csv', 'sample_submission.csv', 'slides.csv', 'centres.csv',
          'test_labels.csv'} <= names
  assert len([n for n in names if n.startswith('train/')]) == 300
  # A demo set of the same seed and sizes shares no id with it.
  demo = synthetic.example_id(4, 'train', 0)
  assert f'train/{demo}.tif' not in names


@pytest.fixture(scope='module')
def standin_set(tmp_path_factory):
  """300 train patches over 2 centres, 5% duplicates."""
  out = tmp_path_factory.mktemp('standin') / 'kaggle'
  pt.make_synthetic(str(out), num_train=300, num_test=30, seed=2, show_progress=False,
                    difficulty=dataclasses.replace(DEFAULT, duplicates=0.05), workers=1)
  return out


def test_slides_and_centres_name_every_patch_in_the_communitys_form(standin_set):
  labels = pd.read_csv(standin_set / kaggle.LABELS_CSV)
  test = pd.read_csv(standin_set / 'sample_submission.csv')
  answers = pd.read_csv(standin_set / synthetic.TEST_LABELS_CSV)
  assert list(answers['id']) == list(test['id']) and set(answers['label']) == {0, 1}
  slides = pd.read_csv(standin_set / synthetic.SLIDES_CSV)
  centres = pd.read_csv(standin_set / synthetic.CENTRES_CSV)
  assert list(slides.columns) == ['id', 'wsi'] and list(centres.columns) == ['id', 'centre']
  assert list(slides['id']) == list(labels['id']) + list(test['id'])
  assert list(centres['id']) == list(slides['id'])
  wsi = slides.set_index('id')['wsi']
  # Test patches come from slides of their own, as Kaggle's do (by index, not only by name).
  def index(names):
    return {int(name.rsplit('_', 1)[1]) for name in names}
  assert max(index(wsi[labels['id']])) < min(index(wsi[test['id']]))
  # The answer key agrees with the slides: test positives sit on tumour slides too.
  assert wsi[answers.loc[answers['label'] == 1, 'id']].str.contains('_tumor_').all()
  assert 0.3 < answers['label'].mean() < 0.5
  # Each slide sits in one centre, which its name says; positives only on tumour slides.
  joined = slides.merge(centres, on='id')
  assert (joined.groupby('wsi')['centre'].nunique() == 1).all()
  assert all(w.startswith(c + '_') for w, c in zip(joined['wsi'], joined['centre']))
  train = labels.merge(slides, on='id')
  assert train.loc[train['label'] == 1, 'wsi'].str.contains('_tumor_').all()
  assert set(centres['centre']) == {'centre0', 'centre1'}
  # Both CSVs are groups the converter reads (the centres file by its 'centre' column).
  for name in (synthetic.SLIDES_CSV, synthetic.CENTRES_CSV):
    groups = kaggle.read_groups(str(standin_set / name), labels['id'].to_numpy())
    assert len(groups) == len(labels)


def test_duplicates_are_byte_copies_within_a_slide_and_label(standin_set):
  labels = pd.read_csv(standin_set / kaggle.LABELS_CSV)
  wsi = pd.read_csv(standin_set / synthetic.SLIDES_CSV).set_index('id')['wsi']
  by_digest = {}
  for name, label in zip(labels['id'], labels['label']):
    with open(standin_set / 'train' / f'{name}.tif', 'rb') as f:
      by_digest.setdefault(hashlib.sha256(f.read()).hexdigest(), []).append((name, label))
  copies = [group for group in by_digest.values() if len(group) > 1]
  assert sum(len(g) - 1 for g in copies) == 15  # round(0.05 * 300)
  test = pd.read_csv(standin_set / 'sample_submission.csv')['id']
  test_digests = set()
  for name in test:  # Kaggle's test patches copy nothing.
    with open(standin_set / 'test' / f'{name}.tif', 'rb') as f:
      test_digests.add(hashlib.sha256(f.read()).hexdigest())
  assert len(test_digests) == len(test) and not test_digests & set(by_digest)
  for group in copies:
    assert len({label for _, label in group}) == 1
    assert len({wsi[name] for name, _ in group}) == 1


def test_a_slide_split_of_the_stand_in_converts_and_finds_its_duplicates(standin_set, tmp_path):
  """The user's path: --groups_csv=slides.csv, --drop_duplicates."""
  manifest = pt.make_records(str(standin_set), str(tmp_path / 'rec'), per_class=0,
                             groups_csv=str(standin_set / synthetic.SLIDES_CSV),
                             drop_duplicates=True, show_progress=False, log=lambda *a: None)
  assert manifest['duplicates']['dropped']['count'] == 15
  assert manifest['splits']['train']['count'] + manifest['splits']['val']['count'] == 285


def _slide(params, centre, index):
  return standin.make_slide(params, 0, index, centre, True)


def _mean_colour(params, centre, index, seed):
  """Mean RGB of a negative patch of one slide."""
  slide = _slide(params, centre, index)
  return standin.make_patch(np.random.default_rng(seed), 0, slide, params).reshape(-1, 3).mean(0)


@pytest.mark.parametrize('centre_stain, centre_tint, separable', [
    (DEFAULT.centre_stain, 0.0, True), (0.0, DEFAULT.centre_tint, True), (0.0, 0.0, False)])
def test_patches_of_one_centre_share_a_stain(centre_stain, centre_tint, separable):
  """Nearest centre mean colour tells a patch's centre, unless the centres share a stain and tint."""
  params = dataclasses.replace(DEFAULT, centre_stain=centre_stain, centre_tint=centre_tint,
                               scanner=0.0)
  colours = {c: np.array([_mean_colour(params, c, 2 * k + c, k) for k in range(12)])
             for c in range(2)}
  means = {c: v[:6].mean(0) for c, v in colours.items()}  # Learned on half, told on the rest.
  right = sum(np.argmin([np.linalg.norm(x - means[k]) for k in range(2)]) == c
              for c, v in colours.items() for x in v[6:])
  assert (right == 12) == separable, right


def test_the_centre_tint_stains_every_tissue_pixel_of_a_centre():
  """The tint adds its haematoxylin and eosin everywhere: tissue darkens where it is positive."""
  params = dataclasses.replace(DEFAULT, centre_tint=0.0)
  plain = _slide(params, 0, 0)
  for tint in ((0.3, 0.0), (0.0, 0.3)):
    tinted = dataclasses.replace(plain, tint=np.array(tint))
    a, b = (standin.make_patch(np.random.default_rng(7), 0, s, params).astype(int)
            for s in (plain, tinted))
    assert (b <= a).all() and (b < a).mean() > 0.5  # The same draws, noise included.
    # Along the stain's own optical-density vector (not the other stain's).
    density = np.log((a + 0.5) / (b + 0.5)).reshape(-1, 3).mean(0)
    cosine = [density @ v / np.linalg.norm(density) / np.linalg.norm(v) for v in plain.stain]
    assert cosine[0 if tint[0] else 1] > 0.98 and cosine[1 if tint[0] else 0] < 0.95, cosine
  spread = [standin._centre(dataclasses.replace(DEFAULT, centre_tint=t), 0, c)[4]  # pylint: disable=protected-access
            for t in (0.0, 0.32) for c in range(2)]
  assert not np.any(spread[:2]) and np.all(spread[2:])


def test_slides_per_set_follow_patches_per_slide():
  labels = np.array([0, 1] * 1000)
  for per_slide, count in ((100, 20), (400, 10), (1000, 10)):  # At least 5 per centre.
    params = dataclasses.replace(DEFAULT, patches_per_slide=per_slide)
    slide_of, slides = standin.assign_slides(labels, params, 0)
    assert len(slides) == count and len(np.unique(slide_of)) == count
    # Negatives on every kind of slide; positives on tumour slides only.
    tumour = {index for index, _, t in slides if t}
    assert set(slide_of[labels == 1]) <= tumour
    assert set(slide_of[labels == 0]) - tumour and set(slide_of[labels == 0]) & tumour


def test_the_scanner_knob_spreads_the_centres_scanners():
  def scanners(scanner):
    params = dataclasses.replace(DEFAULT, scanner=scanner)
    return [(tuple(s.white), s.blur, s.noise) for s in (_slide(params, c, c) for c in range(2))]
  one = scanners(0.0)
  assert one[0] == one[1]  # One scanner everywhere.
  default = scanners(1.0)
  assert default[0][1:] != default[1][1:] and default[0][0] != default[1][0]


def test_slides_vary_around_their_centre():
  params = DEFAULT
  same = [_slide(params, 0, k).stain for k in range(6)]
  other = [_slide(params, 1, k).stain for k in range(6)]
  assert (np.array(same + other) > 0).all()  # Stains absorb.
  spread = np.mean([np.abs(np.log(s / same[0])).mean() for s in same[1:]])
  between = np.mean([np.abs(np.log(o / s)).mean() for s, o in zip(same, other)])
  assert 0 < spread < between, (spread, between)
  # The spread is the knob's: mean |log ratio| to the centre is sqrt(2 / pi) sigma.
  centre = standin._centre(params, 0, 0)[0]  # pylint: disable=protected-access
  ratios = np.array([np.log(_slide(params, 0, k).stain / centre)[:, 0] for k in range(200)])
  expected = np.sqrt(2 / np.pi) * params.slide_stain
  assert abs(np.abs(ratios).mean() - expected) < 0.15 * expected
  flat = dataclasses.replace(params, slide_stain=0.0)
  assert all(np.array_equal(_slide(flat, 0, k).stain, _slide(flat, 0, 0).stain) for k in range(3))


def _geometries(params, label, n=300):
  return [standin.draw_tumour(np.random.default_rng([label, k]), label, params) for k in range(n)]


def _touches(sdf, margin=0.0):
  return sdf is not None and sdf[32:64, 32:64].min() < margin


def test_labels_follow_the_annotation_and_the_tissue_differs_only_near_an_edge():
  """With an exact annotation (margin 0) the tissue in the center is the label;
  with the default margin about 1% of labels disagree with the tissue (README),
  each within a few pixels of the center, and more with a wider margin."""
  exact = dataclasses.replace(DEFAULT, annotation_margin=0.0)
  for label in (0, 1):
    assert all(_touches(sdf) == bool(label) for sdf, _, _ in _geometries(exact, label))
  wrong = {}
  for sigma in (DEFAULT.annotation_margin, 2 * DEFAULT.annotation_margin):
    wrong[sigma] = 0
    params = dataclasses.replace(DEFAULT, annotation_margin=sigma)
    for label in (0, 1):
      for sdf, _, margin in _geometries(params, label, 1500):
        assert _touches(sdf, margin) == bool(label)  # The annotation decides the label.
        if _touches(sdf) != bool(label):
          wrong[sigma] += 1
          assert abs(sdf[32:64, 32:64].min()) <= abs(margin)
  share = wrong[DEFAULT.annotation_margin] / 3000
  assert 0.005 < share < 0.0125, share
  assert wrong[2 * DEFAULT.annotation_margin] > 1.3 * wrong[DEFAULT.annotation_margin], wrong


def test_context_puts_tumour_in_the_ring_of_negatives_at_its_rate():
  for context in (0.0, 0.3):
    params = dataclasses.replace(DEFAULT, context=context)
    beside = [sdf is not None and sdf.min() < 0 for sdf, _, _ in _geometries(params, 0)]
    assert abs(np.mean(beside) - context) < 0.06
  # Every positive but a faint focus has tumour in its ring too (a sheet or an edge).
  ring = np.ones((96, 96), bool)
  ring[32:64, 32:64] = False
  no_foci = dataclasses.replace(DEFAULT, faint_foci=0.0)
  assert all((sdf[ring] < 0).any() for sdf, _, _ in _geometries(no_foci, 1, 100))


def test_faint_foci_are_small_and_low_grade():
  params = dataclasses.replace(DEFAULT, sheet=0.0, faint_foci=1.0)
  for sdf, grade, _ in _geometries(params, 1, 100):
    assert (sdf < 0).sum() < 250 and grade <= 0.5
  sheets = dataclasses.replace(DEFAULT, sheet=1.0, faint_foci=0.0)
  assert all((sdf < 0).mean() > 0.9 for sdf, _, _ in _geometries(sheets, 1, 50))


def test_mimics_sit_in_patches_of_either_class_at_their_rate_and_never_on_tumour():
  for mimics in (0.0, 0.5):
    params = dataclasses.replace(DEFAULT, mimics=mimics)
    for label in (0, 1):
      drawn = [standin.draw_tissue(np.random.default_rng([label, k]), label, params)
               for k in range(200)]
      if label == 0:  # (A positive's tumour sheet covers the mimic it drew.)
        assert abs(np.mean([t.mimic.any() for t in drawn]) - mimics) < 0.08
      assert not any((t.mimic & t.tumour).any() for t in drawn)
      # Mimics' grade overlaps low-grade tumour's: a crop cannot tell them by grade alone.
      grades = [t.mimic_grade for t in drawn if t.mimic.any()]
      assert all(0.1 <= g <= 0.6 for g in grades)


def test_a_tumour_in_the_center_shows_a_nucleus_there_however_small():
  """A sliver of tumour in the center, too small for its random cells, still gets one."""
  inside = np.zeros((96, 96), bool)
  inside[40:42, 63:66] = True  # 6 pixels: about 0.05 cells expected.
  show = inside.copy()
  show[:, 64:] = False  # The part in the center.
  for k in range(5):
    h, e = np.zeros((96, 96)), np.zeros((96, 96))
    standin._atypical(h, e, np.random.default_rng(k), inside, 0.3, show=show)  # pylint: disable=protected-access
    assert h[show].max() > 0.5, k


def test_a_patch_draws_its_tissue_first_and_the_label_rides_on_the_center():
  """make_patch renders what draw_tissue gives for the same seed: tumour pixels
  are darker (more, larger nuclei) than the same slide's normal tissue."""
  slide = _slide(DEFAULT, 0, 0)
  params = dataclasses.replace(DEFAULT, mimics=0.0, context=0.0, faint_foci=0.0, sheet=0.0)
  inside, outside = [], []
  for k in range(20):
    tissue = standin.draw_tissue(np.random.default_rng(k), 1, params)
    pixels = standin.make_patch(np.random.default_rng(k), 1, slide, params).astype(float)
    assert tissue.tumour[32:64, 32:64].any() or tissue.margin > 0
    if tissue.tumour.all() or not tissue.tumour.any():
      continue
    # Haematoxylin absorbs red: nuclei lower the red channel.
    inside.append(pixels[..., 0][tissue.tumour].mean())
    outside.append(pixels[..., 0][~tissue.tumour].mean())
  assert len(inside) >= 10 and np.mean(inside) < np.mean(outside) - 3, (inside, outside)


@pytest.mark.parametrize('args, message', [
    (['--difficulty=hard'], "flag --difficulty=hard: value should be one of <demo|pcam>"),
    (['--difficulty=pcam', '--context=1.5'], '--context=1.5: must be in [0, 1]'),
    (['--difficulty=pcam', '--centres=0'], '--centres=0: must be a whole number >= 1'),
    (['--difficulty=pcam', '--annotation_margin=nan'],
     '--annotation_margin=nan: must be finite and >= 0'),
    (['--difficulty=pcam', '--centre_stain=inf'], '--centre_stain=inf: must be finite and >= 0'),
    (['--difficulty=pcam', '--duplicates=1'], '--duplicates=1.0: must be in [0, 0.5]'),
    (['--centres=3'], '--centres is a knob of --difficulty=pcam, not of the demo'),
    (['--workers=-1'], '--workers=-1: must be >= 0'),
])
def test_bad_knobs_are_one_line_naming_the_flag(tmp_path, args, message):
  proc = _tool(f'--out_dir={tmp_path / "o"}', '--num_train=10', *args)
  assert proc.returncode != 0
  assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not os.path.exists(tmp_path / 'o')


def test_the_python_api_takes_a_difficulty_or_a_stand_in(tmp_path):
  with pytest.raises(ValueError, match='--difficulty=hard: must be one of demo, pcam'):
    pt.make_synthetic(str(tmp_path / 'a'), num_train=4, difficulty='hard')
  with pytest.raises(ValueError, match=r'sheet=0.95 \+ faint_foci=0.1: must be <= 1'):
    standin.StandIn(sheet=0.95)
  with pytest.raises(ValueError, match=r'centres=2.0: must be a whole number >= 1'):
    standin.StandIn(centres=2.0)
  out = pt.make_synthetic(str(tmp_path / 'b'), num_train=8, num_test=0, show_progress=False,
                          difficulty=pt.StandIn(centres=3), workers=1)
  centres = pd.read_csv(os.path.join(out, synthetic.CENTRES_CSV))
  assert set(centres['centre']) == {'centre0', 'centre1', 'centre2'}


def test_the_demo_is_drawn_as_before(tmp_path):
  """The default difficulty keeps its ids and pixels: records and runs made
  from a demo set before the stand-in came still match a new one."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  out = pt.make_synthetic(str(tmp_path / 'demo'), num_train=6, num_test=2, seed=5,
                          show_progress=False, workers=1)
  labels = pd.read_csv(os.path.join(out, kaggle.LABELS_CSV))
  assert list(labels['id']) == [
      hashlib.sha1(f'pcam-synthetic/5/train/{i}'.encode()).hexdigest() for i in range(6)]
  for i, (name, label) in enumerate(zip(labels['id'], labels['label'])):
    pixels = np.asarray(Image.open(os.path.join(out, 'train', f'{name}.tif')))
    np.testing.assert_array_equal(
        pixels, synthetic.make_patch(np.random.default_rng([5, 1, i]), label))
  assert not os.path.exists(os.path.join(out, synthetic.SLIDES_CSV))
