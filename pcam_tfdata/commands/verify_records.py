r"""Re-reads every shard of a records folder and checks it against manifest.json.

    python tools/verify_records.py records/demo
    python tools/verify_records.py --write_tfds_metadata records/demo

Exit 0 when every checksum, count, image size, label and id checks out, and
TFDS's metadata (dataset_info.json, features.json) agrees with the manifest
or is absent (a folder converted before it was written: a line says how to
add it); otherwise a one-line error naming the shard or file and exit 1.
"""

import sys

from absl import flags

from pcam_tfdata import cli
from pcam_tfdata import fs
from pcam_tfdata import records as records_lib

_VERBOSE = flags.DEFINE_bool('verbose', False, "Show TensorFlow's C++ info and warning lines.")
_WRITE_TFDS_METADATA = flags.DEFINE_bool(
    'write_tfds_metadata', False,
    'Once the shards verify, (re)write dataset_info.json and features.json from the '
    'manifest, so that tfds.builder_from_directory opens the folder.')
PROGRAM = 'verify_records.py'  # How its errors name it.


def main(argv):
  if len(argv) != 2:
    print('usage: verify_records.py [--write_tfds_metadata] RECORDS_DIR', file=sys.stderr)
    sys.exit(2)
  if _WRITE_TFDS_METADATA.value and fs.is_url(argv[1]):
    cli.fail(PROGRAM, f'--write_tfds_metadata writes into a local folder, not {argv[1]}: '
                      'write it in the local copy, then copy the two files over')
  cli.import_tensorflow_for([argv[1]], _VERBOSE.value)
  try:
    records = records_lib.Records.open(argv[1])  # A wrong folder fails before TF starts.
    cli.import_tensorflow(_VERBOSE.value)
    from pcam_tfdata.training import verify  # pylint: disable=g-import-not-at-top
    # The metadata about to be rewritten is not checked: rewriting mends it.
    total = verify.verify(records, check_tfds_metadata=not _WRITE_TFDS_METADATA.value)
    written = _write_tfds_metadata(argv[1]) if _WRITE_TFDS_METADATA.value else None
  except ValueError as e:  # schema.ManifestError, verify.VerifyError, FolderBusy are ones.
    cli.fail(PROGRAM, e)
  print(f'{argv[1]}: all {total} records verified')
  if written:
    print(f'wrote {" and ".join(written)}: tfds.builder_from_directory({argv[1]!r}) opens it')


def _write_tfds_metadata(records_dir):
  from pcam_tfdata.convert import outdir  # pylint: disable=g-import-not-at-top
  try:
    return outdir.write_tfds_metadata(records_dir)
  except OSError as e:  # A read-only folder, say.
    cli.fail(PROGRAM, f'{e.filename or records_dir}: cannot write the TFDS metadata '
                      f'({e.strerror or e})')


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
