"""python tools/make_records.py: the program is pcam_tfdata/commands/make_records.py (also pcam-make-records)."""

from pcam_tfdata import cli
from pcam_tfdata.commands import make_records

if __name__ == '__main__':
  cli.run_program(make_records)
