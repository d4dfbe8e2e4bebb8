"""What every entry point shares: a quiet TensorFlow start-up and one-line errors.

TensorFlow's C++ runtime logs through absl, and the lines it writes while its
libraries load (oneDNN's "custom operations are on ... round-off errors", the
CPU-feature notice, CUDA plugin registration) come before absl's logging is
initialised, so TF_CPP_MIN_LOG_LEVEL does not reach them (tensorflow/tensorflow
#100442). Which of them appear depends on the CPU and the build, so a user's
terminal (and any test that reads stderr) would depend on the machine. Entry
points therefore import TensorFlow through `import_tensorflow`, which sends
file descriptor 2 through a small filter process while the libraries load:
C++ log records below the chosen level are dropped, every other line goes on
to the terminal at once. Library modules never call it: they import
TensorFlow as usual and leave the terminal to their caller.
"""

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys

from pcam_tfdata import fs

# TF_CPP_MIN_LOG_LEVEL when neither the user's environment nor --verbose says
# otherwise: errors and fatal errors only.
DEFAULT_TF_LOG_LEVEL = '2'
_SEVERITY = {'I': 0, 'W': 1, 'E': 2, 'F': 3}
# A C++ record, in absl's form (`I0000 00:00:1795800536.636590    1938
# port.cc:153] ...`) or the older TF one (`2025-09-17 14:44:05.157831: I
# tensorflow/...cc:32] ...`). Only C++ sources: Python's absl logging prints
# the same form from `.py` files, and TF_CPP_MIN_LOG_LEVEL is not about those.
_CPP = r'\S+\.(?:cc|cpp|cxx|h|hpp):\d+\] '
_ABSL_RECORD = re.compile(r'^(?P<severity>[IWEF])\d{4} [\d:.]+\s+\d+ ' + _CPP)
_TF_RECORD = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: (?P<severity>[IWEF]) ' + _CPP)
_ABSL_PREAMBLE = 'WARNING: All log messages before absl::InitializeLog() is called'
# The one record known to span two lines (cpu_feature_guard.cc); any other
# line after a dropped record is kept, whatever it is.
_CONTINUATIONS = ('To enable the following instructions:',)
# Error records TensorFlow logs on runs that succeed, dropped with the
# warnings: oneDNN falling back by itself to Eigen for float16 on a CPU
# without AVX-512 FP16, and the coordination service's note, as a
# multi-worker run ends, that its peers have left. (A run that fails says
# why in its own one line.)
_HARMLESS_ERRORS = ('oneDNN supports DT_HALF only on', 'StartAbort')


def tf_log_level(verbose=False):
  """The TF_CPP_MIN_LOG_LEVEL in force: --verbose, else the user's, else ours."""
  if verbose:
    return 0
  level = os.environ.get('TF_CPP_MIN_LOG_LEVEL', DEFAULT_TF_LOG_LEVEL)
  return int(level) if level.isdigit() else int(DEFAULT_TF_LOG_LEVEL)


class LogFilter:
  """Drops TensorFlow C++ log records below `level` from stderr lines, one at a time.

  0 keeps everything; 1 drops info; 2 info, warnings and the error records
  of runs that succeed (_HARMLESS_ERRORS); 3 errors too. The absl preamble
  goes from level 1, and the second line of the CPU-feature notice with its
  record.
  """

  def __init__(self, level):
    self._level = level
    self._dropped_last = False

  def keep(self, line):
    match = _ABSL_RECORD.match(line) or _TF_RECORD.match(line)
    if match:
      drop = _SEVERITY[match['severity']] < self._level or (
          self._level >= 2 and match['severity'] == 'E'
          and any(h in line for h in _HARMLESS_ERRORS))
    elif line.startswith(_ABSL_PREAMBLE):
      drop = self._level >= 1
    else:
      drop = self._dropped_last and line.startswith(_CONTINUATIONS)
    self._dropped_last = drop
    return not drop


def filter_log_lines(lines, level):
  """The lines a LogFilter at `level` keeps, in order."""
  log_filter = LogFilter(level)
  return [line for line in lines if log_filter.keep(line)]


def _filter_stream(level):
  """Runs in the filter process: stdin to stdout, line by line, as it comes."""
  log_filter = LogFilter(level)
  out = sys.stdout.buffer
  for raw in sys.stdin.buffer:
    if log_filter.keep(raw.decode(errors='replace')):
      out.write(raw)
      out.flush()


def _stderr_is_open():
  try:
    os.fstat(2)
  except OSError:
    return False
  return sys.stderr is not None


def import_tensorflow(verbose=False, whole_run=True):
  """Imports TensorFlow with its C++ log records below the log level kept off stderr.

  Call it from an entry point before anything imports TensorFlow. It sets
  TF_CPP_MIN_LOG_LEVEL (a value already in the environment wins unless
  `verbose`), so records logged once TensorFlow runs follow the same level.

  File descriptor 2 goes through a separate filter process, which forwards
  each line as it comes: an import that aborts (a CPU without the
  instructions the build needs) or crashes still shows why. With
  `whole_run` it stays there after the import, for the records TensorFlow
  logs while the program runs (and as it exits), and Python's own stderr
  (`sys.stderr`: errors, progress bars) goes straight to where fd 2 went.

  Args:
    verbose: show every C++ record, as TensorFlow prints them.
    whole_run: filter the C++ records of the whole process, not only of
      the import (a host process that owns its stderr, such as a test
      runner, passes False).

  Returns:
    The tensorflow module.
  """
  level = tf_log_level(verbose)
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = str(level)
  if 'tensorflow' in sys.modules or level == 0 or not _stderr_is_open():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log_filter = subprocess.Popen(
        [sys.executable, '-c', f'import sys; sys.path.insert(0, {root!r}); '
         f'from pcam_tfdata import cli; cli._filter_stream({level})'],
        stdin=subprocess.PIPE, stdout=saved, stderr=saved, close_fds=True)
  except OSError:  # No process to spare: chatter rather than no TensorFlow.
    os.close(saved)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf
  os.dup2(log_filter.stdin.fileno(), 2)
  log_filter.stdin.close()  # fd 2 is this process's end of the pipe now.
  kept = False
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    kept = whole_run
  finally:
    sys.stderr.flush()
    if kept:  # Python's lines straight to the terminal; fd 2 stays on the filter.
      sys.stderr = os.fdopen(saved, 'w', buffering=1, encoding=sys.stderr.encoding,
                             errors=sys.stderr.errors)
    else:
      os.dup2(saved, 2)
      os.close(saved)
      try:
        log_filter.wait(timeout=10)  # EOF once no one else holds the pipe: its last lines first.
      except subprocess.TimeoutExpired:
        pass  # A child of the import still holds the pipe; the filter outlives us.
  return tf


def import_tensorflow_for(paths, verbose=False):
  """Starts TensorFlow now, its log lines filtered, if any of `paths` is a URL.

  Only TensorFlow's filesystems read gs://, s3://, hdfs:// or ram:// (`fs`):
  the entry points that check a local folder before TensorFlow starts
  start it first for a URL.
  """
  if any(path and fs.is_url(path) for path in paths):
    import_tensorflow(verbose)


# Why a write failed, by errno: what the user must change, in their words.
_WRITE_FAILURES = {
    errno.EROFS: 'read-only file system',
    errno.ENOSPC: 'no space left on the device',
    errno.EDQUOT: 'disk quota exceeded',
    errno.EACCES: 'permission denied',
    errno.EPERM: 'permission denied',
    errno.ENOTDIR: 'a part of the path is a file, not a folder',
    errno.EEXIST: 'a part of the path is a file, not a folder',
    errno.EISDIR: 'it is a folder',
}
# TensorFlow's file errors (checkpoints, summaries) say `path; strerror`, the
# path often after an op's device name ("...device:CPU:0}} /runs/r/backup...").
_TF_FILE_ERROR = re.compile(r'(?:^|\s)(/[^;\s]*); (Read-only file system|No space left on '
                            r'device|Disk quota exceeded|Permission denied|Not a directory)')
_STRERRORS = {os.strerror(code): code for code in _WRITE_FAILURES}
# Only ever met writing: with no path named, still the output's.
_WRITE_ONLY = (errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _is_within(path, folder):
  path, folder = os.path.abspath(path), os.path.abspath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _of_output(path, output_path):
  """Whether a failing `path` is the output's: in it, above it, or its partial beside it."""
  if _is_within(path, output_path) or _is_within(output_path, path):
    return True
  name = os.path.basename(os.path.abspath(output_path))
  base = os.path.basename(os.path.abspath(path))
  # What is written beside an output: outdir's '.rec.partial-1f2e…' and its
  # lock '.rec.lock', make_synthetic's and predict's 'syn.partial' (a sibling
  # 'ab' of 'a' is not one).
  return (os.path.dirname(os.path.abspath(path)) == os.path.dirname(os.path.abspath(output_path))
          and (base in (f'{name}.partial', f'.{name}.lock')
               or base.startswith((f'.{name}.partial-', f'.{name}.old-'))))


def write_failure(error, output):
  """One line for `error` met writing `output` (e.g. '--out_dir=runs/x'), or None if not one.

  Args:
    error: an OSError, or a TensorFlow OpError about a file.
    output: what the user asked to be written, as they named it.

  Returns:
    'cannot write OUTPUT: why (path)' when the failing path is the output's
    (or no path is named and the error only comes from writes); 'cannot
    read PATH: permission denied' for a permission error elsewhere (an
    input); else None.
  """
  named = output.split('=', 1)[-1]  # (The path itself, in '--flag=path'.)
  if _unmakeable(error, named):
    return f'cannot write {output}: it cannot be made there (no such file or directory)'
  if isinstance(error, OSError) and error.errno in _WRITE_FAILURES:
    code, path = error.errno, error.filename
  else:
    match = _TF_FILE_ERROR.search(getattr(error, 'message', '') or '')
    if match is None or match[2] not in _STRERRORS:
      return None
    code, path = _STRERRORS[match[2]], match[1]
  if path and not _of_output(os.fsdecode(path), named):
    if code in (errno.EACCES, errno.EPERM):
      return f'cannot read {os.fsdecode(path)}: permission denied'
    return None
  if not path and code not in _WRITE_ONLY:
    return None
  where = f' ({path})' if path and os.path.normpath(path) != os.path.normpath(named) else ''
  return f'cannot write {output}: {_WRITE_FAILURES[code]}{where}'


def _unmakeable(error, named):
  """Whether `error` says the output, or a folder above it, could not be made (/proc/x).

  ENOENT is otherwise a missing input's; only on the output's own path or
  a folder above it (`os.makedirs` names the one it failed on) is it the
  output's.
  """
  return (isinstance(error, FileNotFoundError) and bool(error.filename) and bool(named)
          and not fs.is_url(named) and _is_within(named, os.fsdecode(error.filename)))


@contextlib.contextmanager
def writes_to(program, output):
  """Ends the program with one line and status 1 if a write into `output` fails.

  Other errors pass through untouched.
  """
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    line = write_failure(e, output)
    if line is None:
      raise
    fail(program, line)


def fail(program, message, status=1):
  """Prints `program: error: message` as the one line on stderr and exits."""
  print(f'{program}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


@contextlib.contextmanager
def stops_on_interrupt(program, message):
  """Ends the program with one line and status 130 on Ctrl-C (SIGINT), whatever it was doing.

  A SIGINT that lands inside a TensorFlow op surfaces as that op's error, or
  as a peer's (a multi-worker peer that stopped first closes its sockets):
  once the user has interrupted, any such failure is the interruption.
  """
  interrupted = []

  def on_sigint(signum, frame):
    interrupted.append(True)
    signal.default_int_handler(signum, frame)  # Raises KeyboardInterrupt.

  previous = signal.signal(signal.SIGINT, on_sigint)
  try:
    yield
  except KeyboardInterrupt:
    fail(program, message, status=130)
  except Exception:  # pylint: disable=broad-except
    if interrupted:
      fail(program, message, status=130)
    raise
  finally:
    signal.signal(signal.SIGINT, previous)


_HELP_FLAGS = ('-h', '-?', '-help', '--help', '-helpshort', '--helpshort', '-helpfull',
               '--helpfull', '-helpxml', '--helpxml')


def _flag_error(error):
  """absl's message for a bad command line, tidied to read as ours."""
  message = str(error).removeprefix('ERROR:: ').rstrip('.')
  required = re.match(r'flag --(\w+)=None: Flag --\w+ must have a value other than None$',
                      message)
  return f'--{required[1]} is required' if required else message


def resolve_flagfiles(argv):
  """`--flagfile=configs/NAME.flags`: ./configs/NAME.flags, or where there is none, the copy
  installed with the package (`pip install` without -e, run from any folder).

  Other flagfiles, and one that exists where it is named, are left as they are.
  """
  resolved = []
  for arg in argv:
    match = re.fullmatch(r'(--?flagfile=)(.+)', arg)
    if match and not os.path.exists(match[2]):
      packaged = packaged_config(match[2])
      if packaged:
        arg = match[1] + packaged
    resolved.append(arg)
  return resolved


def packaged_config(path):
  """The installed copy of `configs/NAME.flags` (`path`), or None.

  A wheel holds them in the package (pcam_tfdata/configs, setup.cfg); an
  editable install or a clone beside it (the top's configs/).
  """
  folder, name = os.path.split(os.path.normpath(path))
  if folder != 'configs':
    return None
  package = os.path.dirname(os.path.abspath(__file__))
  for configs in (os.path.join(package, 'configs'),
                  os.path.join(os.path.dirname(package), 'configs')):
    if os.path.isfile(os.path.join(configs, name)):
      return os.path.join(configs, name)
  return None


def run_program(module):
  """Runs `module.main` under absl: `python -m`, a tools/ file or a console script.

  absl's --help lists the flags of the module run as __main__; here that is
  the small file that called us (pip's console-script wrapper, or a tools/
  file), not `module`, where the flags are defined. The module's flags are
  made the main module's key flags, and its docstring the usage text, so
  --help reads as `python -m module --help` does, and ends with status 0.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  main = sys.modules['__main__']
  if main is not module:
    for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    main.__doc__ = module.__doc__
  own_args = sys.argv[1:sys.argv.index('--')] if '--' in sys.argv else sys.argv[1:]
  ran = []
  program = getattr(module, 'PROGRAM', module.__name__.rsplit('.', 1)[-1])
  if main is not module and sys.argv and sys.argv[0]:
    # Named as called: `pcam-make-records` by its console script, a
    # tools/ file by its file name (`python -m` keeps the module's name).
    program = module.PROGRAM = os.path.basename(sys.argv[0])

  def run_main(argv):
    ran.append(True)
    return module.main(argv)

  def parse_flags(argv):
    # absl's own parser prints two lines (the error, then a hint at --help);
    # ours prints one, in the form of every other error here.
    try:
      return flags.FLAGS(resolve_flagfiles(argv))
    except flags.Error as e:
      fail(program, f'{_flag_error(e)}; see --help')

  try:
    app.run(run_main, flags_parser=parse_flags)
  except SystemExit as e:
    # absl ends --help with status 1, before main: help that was asked for is
    # no failure. (A failure of main itself keeps its status, --help=false or not.)
    if e.code == 1 and not ran and any(a.split('=')[0] in _HELP_FLAGS for a in own_args):
      sys.exit(0)
    raise
