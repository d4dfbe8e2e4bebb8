"""python tools/verify_records.py: the program is pcam_tfdata/commands/verify_records.py (also pcam-verify-records)."""

from pcam_tfdata import cli
from pcam_tfdata.commands import verify_records

if __name__ == '__main__':
  cli.run_program(verify_records)
