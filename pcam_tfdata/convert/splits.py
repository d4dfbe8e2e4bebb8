"""Balances classes and splits examples into train and val, reproducibly by seed."""

import numpy as np


def balance(ids, labels, per_class, rng):
  """Indices of `per_class` examples drawn at random from each class.

  Args:
    ids: array of str; sorted first, so the CSV's row order does not matter.
    labels: array of int (0/1).
    per_class: examples to keep per class; 0 keeps every example.
    rng: np.random.Generator.

  Returns:
    Sorted int array of kept indices.

  Raises:
    ValueError: a class holds fewer than `per_class` examples.
  """
  order = np.argsort(ids, kind='stable')
  if per_class == 0:
    return np.sort(order)
  check_per_class(labels, per_class)
  kept = []
  for label in (0, 1):
    members = order[labels[order] == label]
    kept.append(rng.choice(members, per_class, replace=False))
  return np.sort(np.concatenate(kept))


def check_per_class(labels, per_class):
  """Raises ValueError naming --per_class if a class holds fewer examples."""
  have = {label: int(np.sum(labels == label)) for label in (0, 1)}
  for label in (0, 1):
    if have[label] < per_class:
      raise ValueError(f'--per_class={per_class} but class {label} holds only {have[label]} '
                       f'examples: --per_class={min(have.values())} is the most both classes '
                       'hold, --per_class=0 keeps every example (unbalanced)')


def check_fold(num_folds, fold):
  """Raises ValueError naming --fold if it is not one of the K folds."""
  if num_folds and not 0 <= fold < num_folds:
    raise ValueError(f'--fold={fold}: must be in 0..{num_folds - 1} (--num_folds={num_folds})')


def split_train_val(labels, val_fraction, rng, groups=None):
  """Splits indices 0..n-1 into (train, val), each shuffled.

  Without groups the split is stratified: each class sends
  round(val_fraction * its count) examples to val. With groups, whole groups
  (e.g. slides) go to val in random order until val reaches its share, so no
  group appears in both splits; the fraction is then approximate.

  Raises:
    ValueError: one of the splits would be empty.
  """
  n = len(labels)
  is_val = np.zeros(n, dtype=bool)
  if groups is None:
    for label in np.unique(labels):
      members = rng.permutation(np.flatnonzero(labels == label))
      is_val[members[:int(round(val_fraction * len(members)))]] = True
  else:
    names, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(names))
    target, taken = val_fraction * n, 0
    chosen = np.zeros(len(names), dtype=bool)
    for g in rng.permutation(len(names)):
      if taken >= target:
        break
      chosen[g] = True
      taken += sizes[g]
    is_val = chosen[inverse]
  train, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)
  if not len(train) or not len(val):
    raise ValueError(f'--val_fraction={val_fraction} leaves {len(train)} train and '
                     f'{len(val)} val examples; both must be non-empty')
  return rng.permutation(train), rng.permutation(val)


def assign_folds(labels, num_folds, rng, groups=None):
  """The fold (0..num_folds-1) of each example, for K-fold cross-validation.

  Without groups, stratified: each class is dealt round-robin over the folds
  in a random order, so fold sizes and class shares differ by at most one
  example. With groups (e.g. slides), whole groups are placed, largest first
  (ties in random order), each in the fold that stays furthest below its
  share of either class, so no group is in two folds and each fold's classes
  are balanced as far as the groups allow (greedy: each group, largest
  first, goes where it adds least to the squared overshoot of each class's
  and the size's share; as sklearn's StratifiedGroupKFold, in spirit).

  Args:
    labels: int array (0/1), in a fixed order (the plan's, sorted by id).
    num_folds: K >= 2.
    rng: np.random.Generator; the same draws for every fold's conversion.
    groups: optional array of group names aligned with `labels`.

  Returns:
    int array of folds, aligned with `labels`.

  Raises:
    ValueError: K < 2, more folds than examples (or groups), or groups too
      uneven to give every fold one.
  """
  n = len(labels)
  units = n if groups is None else len(np.unique(groups))
  if num_folds < 2 or num_folds > units:
    what = 'examples' if groups is None else 'groups'
    raise ValueError(f'--num_folds={num_folds}: must be 2..{units} (the number of {what})')
  folds = np.zeros(n, dtype=np.int64)
  if groups is None:
    for label in np.unique(labels):
      members = rng.permutation(np.flatnonzero(labels == label))
      # Each class starts where the last one left off, so sizes stay even too.
      start = int(np.sum(labels < label)) % num_folds
      folds[members] = (np.arange(len(members)) + start) % num_folds
    return folds
  names, inverse = np.unique(groups, return_inverse=True)
  # Per group: examples of class 0, of class 1, and in all.
  counts = np.zeros((len(names), 3))
  np.add.at(counts, (inverse, np.asarray(labels, dtype=np.int64)), 1)
  counts[:, 2] = counts[:, :2].sum(1)
  targets = np.maximum(counts.sum(0), 1) / num_folds  # Each fold's share.
  order = rng.permutation(len(names))
  order = order[np.argsort(-counts[order, 2], kind='stable')]  # Largest first.
  filled = np.zeros((num_folds, 3))
  group_fold = np.zeros(len(names), dtype=np.int64)
  for g in order:
    # The fold where g adds least to the squared overshoot of each class and
    # of the size over their shares: a class a fold lacks is cheap there,
    # and an empty fold is always cheaper than a filled one of the same class.
    grown = ((filled + counts[g]) / targets) ** 2 - (filled / targets) ** 2
    fold = int(np.argmin(grown.sum(1)))
    group_fold[g] = fold
    filled[fold] += counts[g]
  if (filled[:, 2] == 0).any():
    raise ValueError(f'--num_folds={num_folds}: the {len(names)} groups cannot fill '
                     f'{num_folds} folds')
  return group_fold[inverse]


def num_shards_for(count, bytes_per_example, minimum, requested=0, target_bytes=128 << 20):
  """How many shards a split gets.

  Auto (requested=0): at least `minimum` (for interleaving and for that many
  input pipelines), more when shards would pass `target_bytes`; never more
  shards than examples, since a shard may not be empty.
  """
  if requested:
    return requested
  by_size = -(-count * bytes_per_example // target_bytes)
  return max(1, min(count, max(minimum, by_size)))


def shard_ranges(count, num_shards):
  """[start, stop) of each shard: contiguous, sizes differing by at most one."""
  bounds = [count * i // num_shards for i in range(num_shards + 1)]
  return list(zip(bounds[:-1], bounds[1:]))
