"""python tools/launch_local_cluster.py: the program is pcam_tfdata/commands/launch_local_cluster.py (also pcam-launch-local-cluster)."""

from pcam_tfdata import cli
from pcam_tfdata.commands import launch_local_cluster

if __name__ == '__main__':
  cli.run_program(launch_local_cluster)
