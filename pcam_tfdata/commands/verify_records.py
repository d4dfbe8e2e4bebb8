r"""Re-reads every shard of a records folder and checks it against manifest.json.

    python tools/verify_records.py records/demo

Exit 0 when every checksum, count, image size, label and id checks out;
otherwise a one-line error naming the shard and exit 1.
"""

import sys

from absl import flags

from pcam_tfdata import cli
from pcam_tfdata import records as records_lib

_VERBOSE = flags.DEFINE_bool('verbose', False, "Show TensorFlow's C++ info and warning lines.")
PROGRAM = 'verify_records.py'  # How its errors name it.


def main(argv):
  if len(argv) != 2:
    print('usage: verify_records.py RECORDS_DIR', file=sys.stderr)
    sys.exit(2)
  try:
    records = records_lib.Records.open(argv[1])  # A wrong folder fails before TF starts.
    cli.import_tensorflow(_VERBOSE.value)
    from pcam_tfdata.training import verify  # pylint: disable=g-import-not-at-top
    total = verify.verify(records)
  except ValueError as e:  # schema.ManifestError and verify.VerifyError are ones.
    cli.fail(PROGRAM, e)
  print(f'{argv[1]}: all {total} records verified')


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
