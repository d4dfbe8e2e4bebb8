"""Finds identical patches and identical stored crops: cheap keys, confirmed byte for byte.

The model sees only the stored centre crop, so for training and validation
two patches with the same crop are one image, whatever their borders. The
converters take two keys of every patch while they decode it anyway: the
CRC32C of the full 96x96x3 pixels (`patch_key`) and of the stored crop (at
--crop_size=96 the crop is the patch: one key, computed once). A CRC32C
costs about 2 us a full patch here, where a SHA-256 would cost 18 us, a
quarter of the converter's time per patch; a 32x32 crop's key adds about
1.6 us (its strided copy, mostly). Patches that share a key are only
candidates: `find_groups` reads them again and groups them by the SHA-256 of
their pixels (or crops), so a group is exactly a set of identical patches
(or crops) and a CRC collision (about ten pairs are expected among PCam's
277,483 patches) groups nothing. Every group of identical patches lies
inside one group of identical crops.

What --drop_duplicates leaves out (`drop_plan`) depends only on the pixels,
the crop size and the labels, never on a seed or a fold, so every fold's
conversion drops the same ids. Each dropped id is listed with a reason:
  'same patch'          its full patch is identical to `same_as`, kept;
  'same crop'           its stored crop is identical to `same_as`'s, kept
                        (the borders differ);
  'conflicting labels'  the labelled patches of its crop group disagree, so
                        none of them is kept; `same_as` names a patch of the
                        group (a test patch, kept, when the group has one).
"""

import collections
import dataclasses
import hashlib

import google_crc32c
import numpy as np

from pcam_tfdata.convert import tiff
from pcam_tfdata import schema

NO_KEY = -1  # An unreadable patch (skipped with --skip_bad): never grouped.
SAME_PATCH = 'same patch'
SAME_CROP = 'same crop'
CONFLICTING_LABELS = 'conflicting labels'
REASONS = (SAME_PATCH, SAME_CROP, CONFLICTING_LABELS)
_SHOWN = 10  # Groups listed by id in the manifest, as examples.


def patch_key(pixels):
  """The CRC32C of pixels (a uint8 array, any layout, read in C order; or their bytes)."""
  if not isinstance(pixels, bytes):
    pixels = np.asarray(pixels, dtype=np.uint8).tobytes()
  return google_crc32c.value(pixels)


def patch_keys(pixels, crop_size, crop=None):
  """(key of the full patch, key of its stored centre crop); one key when the crop is the patch.

  `crop`: the crop's pixels or bytes when the caller has made them already
  (the shard writers): not cut again.
  """
  full = patch_key(pixels)
  if crop_size == pixels.shape[0]:
    return full, full
  return full, patch_key(tiff.center_crop(pixels, crop_size) if crop is None else crop)


def _shared(keys):
  """Bool per patch: its key is another patch's too (and is not NO_KEY)."""
  if not len(keys):
    return np.zeros(0, bool)
  _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
  return (counts[inverse] > 1) & (keys != NO_KEY)


def _groups_of(members):
  return sorted((np.sort(m) for m in members.values() if len(m) > 1), key=lambda g: g[0])


def find_groups(keys, read_patches, crop_size=schema.PATCH_SIZE, crop_keys=None):
  """The groups of identical patches, and of patches whose stored crops are identical.

  Args:
    keys: int array of `patch_key`s of the full patches; NO_KEY is never
      grouped.
    read_patches: function from a sorted int array of patch indices to an
      iterable of (index, full pixels as a uint8 array) for each, in any
      order. Each patch is hashed as it comes: only the digests are kept, so
      a source with many duplicates costs a read, not memory. A patch is
      read once, whether it is a candidate of one kind or both.
    crop_size: side of the stored centre crop.
    crop_keys: int array of the crops' keys (`patch_keys`); needed when
      the crop is smaller than the patch, unused otherwise.

  Returns:
    (patch groups, crop groups): lists of sorted int arrays of two or more
    indices, each ordered by first index. At crop 96 the two are one list.
  """
  keys = np.asarray(keys, dtype=np.int64)
  cropped = crop_size != schema.PATCH_SIZE
  if cropped and crop_keys is None:
    raise ValueError(f'crop_size={crop_size} needs the crops\' keys')
  full_candidate = _shared(keys)
  crop_keys = np.asarray(crop_keys if cropped else keys, dtype=np.int64)
  crop_candidate = _shared(crop_keys) if cropped else np.zeros(len(keys), bool)
  members, crop_members = collections.defaultdict(list), collections.defaultdict(list)
  for index, pixels in read_patches(np.flatnonzero(full_candidate | crop_candidate)):
    pixels = np.asarray(pixels, np.uint8)
    if full_candidate[index]:
      members[keys[index], hashlib.sha256(pixels.tobytes()).digest()].append(int(index))
    if crop_candidate[index]:
      crop = tiff.center_crop(pixels, crop_size).tobytes()
      crop_members[crop_keys[index], hashlib.sha256(crop).digest()].append(int(index))
  groups = _groups_of(members)
  return groups, (_groups_of(crop_members) if cropped else groups)


@dataclasses.dataclass(frozen=True)
class DropPlan:
  """What --drop_duplicates leaves out, one entry per dropped patch, by index."""
  dropped: np.ndarray  # Sorted indices of the patches left out.
  same_as: np.ndarray  # The patch each copies: the one kept (see the module docstring).
  reasons: list  # One of REASONS each.
  group: np.ndarray  # The crop group each came from (index into the groups given).


def drop_plan(crop_groups, patch_groups, rank, labels, fixed=None, unlabelled=-1):
  """What --drop_duplicates removes: every patch of a crop group but one, or all.

  A crop group keeps its fixed patches if it has any (and drops the rest),
  else its patch of lowest rank; but when its labelled patches disagree it
  keeps none of them (fixed patches stay all the same).

  Args:
    crop_groups, patch_groups: from `find_groups`.
    rank: int array per patch; lower is kept first (ties: lowest index,
      which the callers order by id).
    labels: int array per patch; `unlabelled` (Kaggle's test patches)
      agrees with any label.
    fixed: optional bool array per patch: never dropped (Kaggle's test
      patches, each of which the submission needs).

  Returns:
    A DropPlan.
  """
  rank, labels = np.asarray(rank), np.asarray(labels)
  fixed = np.zeros(len(rank), bool) if fixed is None else np.asarray(fixed, bool)
  same_patch_group = {int(i): n for n, g in enumerate(patch_groups) for i in g}
  rows = []  # (dropped, same_as, reason, group)
  for number, group in enumerate(crop_groups):
    known = labels[group][labels[group] != unlabelled]
    conflict = len(np.unique(known)) > 1
    kept = group[fixed[group]]
    if not len(kept) and not conflict:
      kept = group[np.lexsort((group, rank[group]))[:1]]
    for d in group[~np.isin(group, kept)]:
      if conflict:
        rows.append((d, kept[0] if len(kept) else group[group != d][0], CONFLICTING_LABELS,
                     number))
        continue
      twin = same_patch_group.get(int(d))  # Its group of identical full patches, if any.
      twins = [k for k in kept if twin is not None and same_patch_group.get(int(k)) == twin]
      rows.append((d, twins[0], SAME_PATCH, number) if twins else
                  (d, kept[0], SAME_CROP, number))
  rows.sort(key=lambda r: r[0])
  column = lambda k: np.asarray([r[k] for r in rows], dtype=np.int64)
  return DropPlan(column(0), column(1), [r[2] for r in rows], column(3))


def describe_dropped(ids, plan):
  """The manifest's record of what --drop_duplicates left out.

  Args:
    ids: array of every scanned patch's id.
    plan: from `drop_plan`.

  Returns:
    {'count', 'groups' (crop groups that lost a patch), 'label_conflicts'
    (those that lost all their labelled patches for it), 'reasons' {reason:
    count}, 'ids': every dropped id with the id it copies and the reason}.
  """
  reasons = collections.Counter(plan.reasons)
  conflicted = {g for g, r in zip(plan.group.tolist(), plan.reasons) if r == CONFLICTING_LABELS}
  return {'count': len(plan.dropped), 'groups': len(np.unique(plan.group)),
          'label_conflicts': len(conflicted),
          'reasons': {r: reasons[r] for r in REASONS if reasons[r]},
          'ids': [{'id': ids[d], 'same_as': ids[k], 'reason': r}
                  for d, k, r in zip(plan.dropped, plan.same_as, plan.reasons)]}


def summarize(patch_groups, crop_groups, crop_size, ids, split_names, labels, unlabelled=-1):
  """The manifest's account of identical patches and identical stored crops.

  Args:
    patch_groups, crop_groups: from `find_groups`.
    crop_size: side of the stored crop.
    ids, split_names, labels: arrays per patch (labels `unlabelled` for
      Kaggle's test patches, which agree with anything).

  Returns:
    The account of identical full patches: `method`; `groups` and `patches`
    in them; `within` {split: groups whose patches all sit in that split};
    `across` {'train/val'...: groups with patches in both};
    `label_conflicts`, groups whose labelled patches disagree; `first`, the
    first groups by id with their splits and labels. Its `crop` entry is the
    same account of identical stored crops (at crop 96, of the same groups).
  """
  crop_method = (f'CRC32C of each stored {crop_size}x{crop_size} centre crop, confirmed by '
                 'the SHA-256 of its pixels' if crop_size != schema.PATCH_SIZE else
                 'the stored crop is the full patch: the groups of identical patches')
  return {**_summarize(patch_groups, 'CRC32C of each full 96x96x3 patch, confirmed by the '
                       'SHA-256 of its pixels', ids, split_names, labels, unlabelled),
          'crop': _summarize(crop_groups, crop_method, ids, split_names, labels, unlabelled)}


def _summarize(groups, method, ids, split_names, labels, unlabelled):
  within, across = collections.Counter(), collections.Counter()
  conflicts, shown = 0, []
  for group in groups:
    names = sorted(set(split_names[group].tolist()), key=schema.split_rank)
    if len(names) == 1:
      within[names[0]] += 1
    for a in range(len(names)):
      for b in range(a + 1, len(names)):
        across[f'{names[a]}/{names[b]}'] += 1
    known = {int(l) for l in labels[group] if l != unlabelled}
    agree = len(known) <= 1
    conflicts += not agree
    if len(shown) < _SHOWN:
      shown.append({'ids': ids[group].tolist(), 'splits': split_names[group].tolist(),
                    'labels': [int(l) for l in labels[group]], 'labels_agree': agree})
  return {'method': method, 'groups': len(groups), 'patches': int(sum(len(g) for g in groups)),
          'within': dict(sorted(within.items(), key=lambda kv: schema.split_rank(kv[0]))),
          'across': dict(sorted(across.items())), 'label_conflicts': conflicts,
          'first': shown}


def _counts(info):
  """'(7 patches; groups 1 within train, 2 across train/test), 1 with conflicting labels'."""
  parts = [f'{n} within {s}' for s, n in info['within'].items()]
  parts += [f'{n} across {pair}' for pair, n in info['across'].items()]
  conflicts = info['label_conflicts']
  return (f'({info["patches"]:,} patches; groups {", ".join(parts)})'
          + (f', {conflicts} with conflicting labels' if conflicts else ''))


def summary_line(info, total, crop_size):
  """One line for the manifest's `duplicates` section, for a `total`-patch output."""
  if not info['groups']:
    line = f'duplicates: no pixel-identical patches among the {total:,} written'
  else:
    line = (f'duplicates: {info["groups"]:,} groups of pixel-identical patches {_counts(info)}'
            f', e.g. {", ".join(info["first"][0]["ids"][:3])}')
  crop = info.get('crop')
  if crop is None:  # An output of an earlier version.
    line += '; identical stored crops not counted (an earlier version\'s output)'
  elif crop_size != schema.PATCH_SIZE:
    what = f'identical stored {crop_size}x{crop_size} crops'
    line += (f'; {crop["groups"]:,} groups of {what} {_counts(crop)}' if crop['groups'] else
             f'; no {what}')
  dropped = info.get('dropped')
  if dropped is not None:
    conflicts = dropped['reasons'].get(CONFLICTING_LABELS, 0) if 'reasons' in dropped else 0
    return (line + f'; --drop_duplicates left out {dropped["count"]:,} patches of '
            f'{dropped["groups"]:,} groups before the split'
            + (f' ({conflicts:,} for conflicting labels)' if conflicts else ''))
  if info['groups'] or (crop and crop['groups']):
    line += ('; --drop_duplicates keeps one patch of each crop group (none of its labelled '
             'patches if their labels conflict)')
  return line
