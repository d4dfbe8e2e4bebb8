r"""Runs a tf.data service dispatcher or worker (pipeline.make_service_dataset reads from it).

    python -m pcam_tfdata.data_service --role=dispatcher --port=5050 --work_dir=/shared/dispatcher
    python -m pcam_tfdata.data_service --role=worker --port=5051 --dispatcher_address=HOST:5050
    python -m pcam_tfdata.train ... --data_service_address=grpc://HOST:5050

Service workers run the streaming form of the training pipeline; see
pipeline.make_service_dataset. With --work_dir the dispatcher journals its
state there (TensorFlow's fault-tolerant mode): killed and restarted with the
same --work_dir and --port, it picks up its jobs, and the trainers and
workers, which retry meanwhile, go on. Without it, a restarted dispatcher
knows no job, and the trainers fail.
"""

import sys

from absl import flags

from pcam_tfdata import cli
from pcam_tfdata import rundir

_ROLE = flags.DEFINE_enum('role', None, ['dispatcher', 'worker'], 'Which server to run.')
_PORT = flags.DEFINE_integer('port', 5050, 'Port to serve on (0: any free one, printed).')
_WORK_DIR = flags.DEFINE_string(
    'work_dir', None, 'Dispatcher: a folder to journal its state in, so that a restart with the '
    'same --work_dir and --port resumes its jobs (fault-tolerant mode). Default: none, state in '
    'memory only.')
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
    cli.fail(PROGRAM, f'unexpected arguments {" ".join(argv[1:])}')
  if _ROLE.value is None:
    cli.fail(PROGRAM, '--role=dispatcher or --role=worker is required')
  if _ROLE.value == 'worker' and not _DISPATCHER_ADDRESS.value:
    cli.fail(PROGRAM, '--dispatcher_address is required for a worker')
  if _ROLE.value == 'worker' and _WORK_DIR.value:
    cli.fail(PROGRAM, '--work_dir is the dispatcher\'s; a worker keeps no state')
  if _WORK_DIR.value:
    with cli.writes_to(PROGRAM, f'--work_dir={_WORK_DIR.value}'):
      rundir.check_writable(_WORK_DIR.value)
  tf = cli.import_tensorflow(_VERBOSE.value)
  service = tf.data.experimental.service
  if _ROLE.value == 'dispatcher':
    from pcam_tfdata.training import service as service_lib  # pylint: disable=g-import-not-at-top
    server = service.DispatchServer(service_lib.dispatcher_config(_PORT.value, _WORK_DIR.value))
    port = int(server.target.rsplit(':', 1)[1])  # The one bound, also for --port=0.
    print(f'dispatcher serving on grpc://localhost:{port}' +
          (f', journal in {_WORK_DIR.value}' if _WORK_DIR.value else
           ' (state in memory only: see --work_dir)'), flush=True)
    _warn('dispatcher', port)
  else:
    server = service.WorkerServer(service.WorkerConfig(
        dispatcher_address=_DISPATCHER_ADDRESS.value.removeprefix('grpc://'),
        worker_address=_WORKER_ADDRESS.value, port=_PORT.value))
    # The one bound, also for --port=0 (WorkerServer keeps it in its address alone).
    port = int(server._address.rsplit(':', 1)[1])  # pylint: disable=protected-access
    print(f'worker serving on port {port} for {_DISPATCHER_ADDRESS.value}', flush=True)
    _warn('worker', port)
  server.join()


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
