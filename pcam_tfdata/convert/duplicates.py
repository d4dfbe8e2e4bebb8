"""Finds pixel-identical patches: a cheap key per patch, confirmed byte for byte.

The converters take `patch_key` (CRC32C of the full 96x96x3 pixels) of every
patch while they decode it anyway: about 2 us a patch here, where a SHA-256
would cost 18 us, a quarter of the converter's time per patch. Patches that
share a key are only candidates: `find_groups` reads them again and groups
them by the SHA-256 of their pixels, so a group is exactly a set of
pixel-identical patches and a CRC collision (about ten pairs are expected
among PCam's 277,483 patches) groups nothing.
"""

import collections
import hashlib

import google_crc32c
import numpy as np

from pcam_tfdata import schema

NO_KEY = -1  # An unreadable patch (skipped with --skip_bad): never grouped.
_SHOWN = 10  # Groups listed by id in the manifest, as examples.


def patch_key(pixels):
  """The CRC32C of a patch's pixels (uint8 array, any layout) in C order."""
  return google_crc32c.value(np.asarray(pixels, dtype=np.uint8).tobytes())


def find_groups(keys, read_patches):
  """The groups of pixel-identical patches among those keyed.

  Args:
    keys: int array of `patch_key`s, one per patch; NO_KEY is never grouped.
    read_patches: function from a sorted int array of patch indices to an
      iterable of (index, pixels as a uint8 array or bytes) for each, in
      any order. Each patch is hashed as it comes: only the digests are
      kept, so a source with many duplicates costs a read, not memory.

  Returns:
    A list of sorted int arrays of two or more indices, ordered by their
    first index.
  """
  keys = np.asarray(keys, dtype=np.int64)
  if not len(keys):
    return []
  _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
  candidates = np.flatnonzero((counts[inverse] > 1) & (keys != NO_KEY))
  members = collections.defaultdict(list)
  for index, pixels in read_patches(candidates):
    data = pixels if isinstance(pixels, bytes) else np.asarray(pixels, np.uint8).tobytes()
    members[keys[index], hashlib.sha256(data).digest()].append(int(index))
  return sorted((np.sort(m) for m in members.values() if len(m) > 1), key=lambda g: g[0])


def drop_plan(groups, rank, fixed=None):
  """What --drop_duplicates removes: every patch of a group but one.

  Args:
    groups: from `find_groups`.
    rank: int array per patch; each group keeps its patch of lowest rank
      (ties: lowest index, which the callers order by id).
    fixed: optional bool array per patch: never dropped (Kaggle's test
      patches, each of which the submission needs). A group holding one
      keeps all its fixed patches and drops the rest.

  Returns:
    (dropped, same_as): sorted int array of the patches to drop, and for each
    the index of the patch it duplicates (the one kept).
  """
  rank = np.asarray(rank)
  dropped, same_as = [], []
  for group in groups:
    keep = group[np.lexsort((group, rank[group]))[0]]
    if fixed is not None and fixed[group].any():
      keep = group[fixed[group]][0]
      gone = group[~fixed[group]]
    else:
      gone = group[group != keep]
    dropped.extend(gone.tolist())
    same_as.extend([int(keep)] * len(gone))
  order = np.argsort(dropped, kind='stable')
  return (np.asarray(dropped, dtype=np.int64)[order], np.asarray(same_as, dtype=np.int64)[order])


def describe_dropped(ids, dropped, same_as, summary):
  """The manifest's record of what --drop_duplicates left out.

  Args:
    ids: array of every scanned patch's id.
    dropped, same_as: from `drop_plan`.
    summary: `summarize` of the scan's groups.

  Returns:
    {'count', 'groups' (those that lost a patch), 'label_conflicts', 'ids':
    every dropped id with the id it copies}.
  """
  return {'count': len(dropped), 'groups': len(np.unique(same_as)),
          'label_conflicts': summary['label_conflicts'],
          'ids': [{'id': ids[d], 'same_as': ids[k]} for d, k in zip(dropped, same_as)]}


def summarize(groups, ids, split_names, labels, unlabelled=-1):
  """The manifest's account of duplicate groups.

  Args:
    groups: from `find_groups`.
    ids, split_names, labels: arrays per patch (labels `unlabelled` for
      Kaggle's test patches, which agree with anything).

  Returns:
    A dict: `groups` and `patches` in them; `within` {split: groups whose
    patches all sit in that split}; `across` {'train/val'...: groups with
    patches in both}; `label_conflicts`, groups whose labelled patches
    disagree; `first`, the first groups by id with their splits and labels.
  """
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
  return {'method': 'CRC32C of each full 96x96x3 patch, confirmed by the SHA-256 of its pixels',
          'groups': len(groups), 'patches': int(sum(len(g) for g in groups)),
          'within': dict(sorted(within.items(), key=lambda kv: schema.split_rank(kv[0]))),
          'across': dict(sorted(across.items())), 'label_conflicts': conflicts,
          'first': shown}


def summary_line(info, total):
  """One line for the manifest's `duplicates` section, for a `total`-patch output."""
  dropped = info.get('dropped')
  tail = ''
  if dropped is not None:
    tail = (f'; --drop_duplicates left out {dropped["count"]:,} patches of '
            f'{dropped["groups"]:,} groups before the split')
  if not info['groups']:
    return f'duplicates: no pixel-identical patches among the {total:,} written{tail}'
  parts = [f'{n} within {s}' for s, n in info['within'].items()]
  parts += [f'{n} across {pair}' for pair, n in info['across'].items()]
  conflicts = info['label_conflicts']
  return (f'duplicates: {info["groups"]:,} groups of pixel-identical patches '
          f'({info["patches"]:,} patches; groups {", ".join(parts)})'
          + (f', {conflicts} with conflicting labels' if conflicts else '')
          + f', e.g. {", ".join(info["first"][0]["ids"][:3])}'
          + (tail or '; --drop_duplicates keeps one patch of each'))
