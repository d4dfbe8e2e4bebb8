r"""Runs a tf.data service dispatcher or worker (pipeline.make_service_dataset reads from it).

    python -m pcam_tfdata.data_service --role=dispatcher --port=5050
    python -m pcam_tfdata.data_service --role=worker --port=5051 --dispatcher_address=HOST:5050
    python -m pcam_tfdata.train ... --data_service_address=grpc://HOST:5050

Service workers run the streaming form of the training pipeline; see
pipeline.make_service_dataset.
"""

import sys

from absl import flags

from pcam_tfdata import cli

_ROLE = flags.DEFINE_enum('role', None, ['dispatcher', 'worker'], 'Which server to run.')
_PORT = flags.DEFINE_integer('port', 5050, 'Port to serve on.')
_DISPATCHER_ADDRESS = flags.DEFINE_string('dispatcher_address', None,
                                          'host:port of the dispatcher (workers only).')
_WORKER_ADDRESS = flags.DEFINE_string(
    'worker_address', None, 'host:port the dispatcher should reach this worker at '
    '(default: this host and --port).')
_VERBOSE = flags.DEFINE_bool('verbose', False, "Show TensorFlow's C++ info and warning lines.")
PROGRAM = 'data_service'  # How its errors name it (also as __main__).


def _warn(role, port):
  # TensorFlow 2.21's data service knows one transport, plain gRPC, bound to
  # every interface; asked for 'grpc+local' it answers "No credentials factory
  # has been registered for protocol grpc+local".
  print(f'{role} listens on port {port} of every interface, unauthenticated: whoever reaches '
        'it can have this process run TensorFlow ops (read and write files as this user). '
        'Run it on a private network only (README, Security).', flush=True)


def main(argv):
  if len(argv) > 1:
    cli.fail('data_service', f'unexpected arguments {" ".join(argv[1:])}')
  if _ROLE.value is None:
    cli.fail('data_service', '--role=dispatcher or --role=worker is required')
  if _ROLE.value == 'worker' and not _DISPATCHER_ADDRESS.value:
    cli.fail('data_service', '--dispatcher_address is required for a worker')
  tf = cli.import_tensorflow(_VERBOSE.value)
  if _ROLE.value == 'dispatcher':
    server = tf.data.experimental.service.DispatchServer(
        tf.data.experimental.service.DispatcherConfig(port=_PORT.value))
    port = int(server.target.rsplit(':', 1)[1])  # The one bound, also for --port=0.
    print(f'dispatcher serving on grpc://localhost:{port}', flush=True)
    _warn('dispatcher', port)
  else:
    server = tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(
            dispatcher_address=_DISPATCHER_ADDRESS.value.removeprefix('grpc://'),
            worker_address=_WORKER_ADDRESS.value, port=_PORT.value))
    print(f'worker serving on port {_PORT.value} for {_DISPATCHER_ADDRESS.value}', flush=True)
    _warn('worker', _PORT.value)
  server.join()


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
