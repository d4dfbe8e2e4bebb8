r"""Re-reads every shard of a records folder and checks it against manifest.json.

    python tools/verify_records.py records/demo

Exit 0 when every checksum, count, image size, label and id checks out;
otherwise a one-line error naming the shard and exit 1.
"""

import sys

from absl import app

from pcam_tfdata import schema
from pcam_tfdata import verify


def main(argv):
  if len(argv) != 2:
    print('usage: verify_records.py RECORDS_DIR', file=sys.stderr)
    sys.exit(2)
  try:
    total = verify.verify(argv[1])
  except (schema.ManifestError, verify.VerifyError) as e:
    print(f'verify_records.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'{argv[1]}: all {total} records verified')


if __name__ == '__main__':
  app.run(main)
