r"""Runs a tf.data service dispatcher or worker (pipeline.make_service_dataset reads from it).

    python -m pcam_tfdata.data_service --role=dispatcher --port=5050
    python -m pcam_tfdata.data_service --role=worker --port=5051 --dispatcher_address=HOST:5050
    python -m pcam_tfdata.train ... --data_service_address=grpc://HOST:5050

Service workers run the streaming form of the training pipeline; see
pipeline.make_service_dataset.
"""

import sys

from absl import app
from absl import flags
import tensorflow as tf


_ROLE = flags.DEFINE_enum('role', None, ['dispatcher', 'worker'], 'Which server to run.')
_PORT = flags.DEFINE_integer('port', 5050, 'Port to serve on.')
_DISPATCHER_ADDRESS = flags.DEFINE_string('dispatcher_address', None,
                                          'host:port of the dispatcher (workers only).')
_WORKER_ADDRESS = flags.DEFINE_string(
    'worker_address', None, 'host:port the dispatcher should reach this worker at '
    '(default: this host and --port).')


def main(argv):
  del argv
  if _ROLE.value is None:
    print('data_service: error: --role=dispatcher or --role=worker is required', file=sys.stderr)
    sys.exit(1)
  if _ROLE.value == 'dispatcher':
    server = tf.data.experimental.service.DispatchServer(
        tf.data.experimental.service.DispatcherConfig(port=_PORT.value))
    print(f'dispatcher serving on grpc://localhost:{_PORT.value}', flush=True)
  else:
    if not _DISPATCHER_ADDRESS.value:
      print('data_service: error: --dispatcher_address is required for a worker',
            file=sys.stderr)
      sys.exit(1)
    server = tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(
            dispatcher_address=_DISPATCHER_ADDRESS.value.removeprefix('grpc://'),
            worker_address=_WORKER_ADDRESS.value, port=_PORT.value))
    print(f'worker serving on port {_PORT.value} for {_DISPATCHER_ADDRESS.value}', flush=True)
  server.join()


if __name__ == '__main__':
  app.run(main)
