"""What every entry point shares: a quiet TensorFlow start-up and one-line errors.

TensorFlow's C++ runtime logs through absl, and the lines it writes while its
libraries load (oneDNN's "custom operations are on ... round-off errors", the
CPU-feature notice, CUDA plugin registration) come before absl's logging is
initialised, so TF_CPP_MIN_LOG_LEVEL does not reach them (tensorflow/tensorflow
#100442). Which of them appear depends on the CPU and the build, so a user's
terminal (and any test that reads stderr) would depend on the machine. Entry
points therefore import TensorFlow through `import_tensorflow`, which holds
file descriptor 2 while the libraries load and puts back every line that is
not such a log record below the chosen level. Library modules never call it:
they import TensorFlow as usual and leave the terminal to their caller.
"""

import os
import re
import sys
import tempfile

# TF_CPP_MIN_LOG_LEVEL when neither the user's environment nor --verbose says
# otherwise: errors and fatal errors only.
DEFAULT_TF_LOG_LEVEL = '2'
_SEVERITY = {'I': 0, 'W': 1, 'E': 2, 'F': 3}
# absl's form (`I0000 00:00:1795800536.636590    1938 port.cc:153] ...`) and
# the older TF form (`2025-09-17 14:44:05.157831: I tensorflow/...cc:32] ...`).
_ABSL_RECORD = re.compile(r'^(?P<severity>[IWEF])\d{4} [\d:.]+\s+\d+ \S+:\d+\] ')
_TF_RECORD = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: (?P<severity>[IWEF]) \S+:\d+\] ')
_ABSL_PREAMBLE = 'WARNING: All log messages before absl::InitializeLog() is called'
# A Python warning (`file.py:12: UserWarning: ...`) or traceback starts its own
# message; it is never the continuation of a dropped C++ record.
_PYTHON_MESSAGE = re.compile(r'^(\S+:\d+: \w*Warning: |Traceback |\w+Error: )')


def tf_log_level(verbose=False):
  """The TF_CPP_MIN_LOG_LEVEL in force: --verbose, else the user's, else ours."""
  if verbose:
    return 0
  level = os.environ.get('TF_CPP_MIN_LOG_LEVEL', DEFAULT_TF_LOG_LEVEL)
  return int(level) if level.isdigit() else int(DEFAULT_TF_LOG_LEVEL)


def filter_log_lines(lines, level):
  """Drops TensorFlow C++ log records below `level` from captured stderr lines.

  Args:
    lines: lines of text (with or without their newlines).
    level: 0 keeps everything; 1 drops info; 2 info and warnings; 3 errors too.

  Returns:
    The lines kept, in order. A record's continuation lines (the CPU-feature
    notice spans two) go with it.
  """
  kept = []
  dropping = False
  for line in lines:
    match = _ABSL_RECORD.match(line) or _TF_RECORD.match(line)
    if match:
      dropping = _SEVERITY[match['severity']] < level
    elif line.startswith(_ABSL_PREAMBLE):
      dropping = level >= 1  # A warning about where the records below go.
    elif dropping and (not line.strip() or _PYTHON_MESSAGE.match(line)):
      dropping = False
    if not dropping:
      kept.append(line)
  return kept


def import_tensorflow(verbose=False):
  """Imports TensorFlow with its start-up chatter below the log level kept off stderr.

  Call it from an entry point before anything imports TensorFlow. It sets
  TF_CPP_MIN_LOG_LEVEL (a value already in the environment wins unless
  `verbose`), so records logged once TensorFlow runs follow the same level.

  Args:
    verbose: show every C++ info and warning line, as TensorFlow prints them.

  Returns:
    The tensorflow module.
  """
  level = tf_log_level(verbose)
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = str(level)
  if 'tensorflow' in sys.modules or level == 0:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf
  sys.stderr.flush()
  saved = os.dup(2)
  # A file, not a pipe: nothing reads while the import runs, and a pipe's
  # buffer could fill and block the loader.
  with tempfile.TemporaryFile(mode='w+b') as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
    except BaseException:
      _restore(saved, captured, level=0)  # Whatever explains the failure stays.
      raise
    _restore(saved, captured, level)
  return tf


def _restore(saved, captured, level):
  sys.stderr.flush()
  os.dup2(saved, 2)
  os.close(saved)
  captured.seek(0)
  text = captured.read().decode(errors='replace')
  kept = filter_log_lines(text.splitlines(keepends=True), level)
  if kept:
    sys.stderr.write(''.join(kept))
    sys.stderr.flush()


def fail(program, message, status=1):
  """Prints `program: error: message` as the one line on stderr and exits."""
  print(f'{program}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)
