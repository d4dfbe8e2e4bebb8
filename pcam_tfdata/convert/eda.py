"""EDA pictures written beside the records: class balance and sample patches."""

import os

import matplotlib
matplotlib.use('Agg')  # Files only; no display on training hosts.
import matplotlib.patches  # pylint: disable=g-import-not-at-top
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from pcam_tfdata.convert import tiff

CLASS_BALANCE_PNG = 'eda_class_balance.png'
SAMPLES_PNG = 'eda_samples.png'
SAMPLES_PER_CLASS = 8
_CLASS_NAMES = {'0': 'no tumour (0)', '1': 'tumour (1)'}


def plot_class_balance(before, after, path):
  """Bar charts of label counts in the source and in each written split.

  Args:
    before: {label str: count} in the source.
    after: {split: {label str: count}}.
    path: the PNG to write.
  """
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  labels = sorted(before)
  axes[0].bar([_CLASS_NAMES.get(l, l) for l in labels], [before[l] for l in labels],
              color=['tab:blue', 'tab:red'][:len(labels)])
  axes[0].set_title(f'source: {sum(before.values()):,} labelled patches')
  for label, count in zip(labels, (before[l] for l in labels)):
    axes[0].annotate(f'{count:,}', (labels.index(label), count), ha='center', va='bottom')
  names = [s for s in after if s != 'test']
  width = 0.4
  for k, label in enumerate(labels):
    counts = [after[s].get(label, 0) for s in names]
    xs = [i + (k - 0.5) * width for i in range(len(names))]
    axes[1].bar(xs, counts, width, label=_CLASS_NAMES.get(label, label),
                color=['tab:blue', 'tab:red'][k % 2])
    for x, c in zip(xs, counts):
      axes[1].annotate(f'{c:,}', (x, c), ha='center', va='bottom')
  axes[1].set_xticks(range(len(names)), names)
  axes[1].set_title('written (after balancing and splitting)')
  axes[1].legend()
  for ax in axes:
    ax.set_ylabel('patches')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_samples(samples, crop_size, path):
  """A grid of patches per class (a row each), the center crop outlined.

  Args:
    samples: {label: [(id, uint8 [96, 96, 3]), ...]} for labels 0 and 1.
    crop_size: side of the crop to outline.
    path: the PNG to write.
  """
  per_class = max(1, max(len(v) for v in samples.values()))
  fig, axes = plt.subplots(2, per_class, figsize=(1.6 * per_class, 3.8), squeeze=False)
  for row, label in enumerate((0, 1)):
    chosen = samples.get(label, [])
    for col in range(per_class):
      ax = axes[row][col]
      ax.axis('off')
      if col < len(chosen):
        example_id, pixels = chosen[col]
        ax.imshow(pixels)
        offset = (pixels.shape[0] - crop_size) / 2 - 0.5
        ax.add_patch(matplotlib.patches.Rectangle(
            (offset, offset), crop_size, crop_size, fill=False, edgecolor='lime', lw=1.5))
        ax.set_title(example_id[-8:], fontsize=7)
    axes[row][0].text(-0.1, 0.5, _CLASS_NAMES[str(label)], rotation=90, va='center',
                      ha='right', transform=axes[row][0].transAxes)
  fig.suptitle(f'sample patches; the label describes the outlined center {crop_size}x{crop_size}')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def samples_from_files(examples, per_class=SAMPLES_PER_CLASS):
  """Reads the first `per_class` readable patches of each class.

  Args:
    examples: iterable of (id, label, file path).
  """
  chosen = {0: [], 1: []}
  for example_id, label, source in examples:
    if label in chosen and len(chosen[label]) < per_class:
      try:
        chosen[label].append((example_id, tiff.read_patch(source)))
      except (tiff.BadImageError, OSError):
        continue
    if all(len(v) == per_class for v in chosen.values()):
      break
  return chosen


def write_pictures(out_dir, manifest, samples):
  """Writes both pictures of a conversion into `out_dir`."""
  plot_class_balance(manifest['source']['label_counts'],
                     {s: v['label_counts'] for s, v in manifest['splits'].items()},
                     os.path.join(out_dir, CLASS_BALANCE_PNG))
  plot_samples(samples, manifest['image_shape'][0], os.path.join(out_dir, SAMPLES_PNG))
