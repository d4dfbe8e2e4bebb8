"""The console scripts `pip install` puts on the PATH (setup.cfg), and the
programs behind tools/make_records.py, tools/verify_records.py and
tools/launch_local_cluster.py (which only run them).

Each console script is the same program, with the same flags, as its
`tools/...` or `python -m ...` form.
"""

import importlib

from pcam_tfdata import cli


# Named as the scripts (pcam_make_records for pcam-make-records): a function
# named as its submodule would be replaced by it on import.
def _run(module_name):
  cli.run_program(importlib.import_module(module_name))


def pcam_make_records():
  _run('pcam_tfdata.commands.make_records')


def pcam_verify_records():
  _run('pcam_tfdata.commands.verify_records')


def pcam_launch_local_cluster():
  _run('pcam_tfdata.commands.launch_local_cluster')


def pcam_train():
  _run('pcam_tfdata.train')


def pcam_predict():
  _run('pcam_tfdata.predict')


def pcam_report():
  _run('pcam_tfdata.report')


def pcam_tune():
  _run('pcam_tfdata.tune')


def pcam_data_service():
  _run('pcam_tfdata.data_service')
