"""The machine a benchmark ran on, in one line: CPU model, cores, the flags that matter.

Figures from tools/bench_*.py differ by CPU generation (AVX-512 and AMX run
bfloat16 natively; TensorFlow turns oneDNN on by default only on some CPUs),
so every table says which CPU it came from.
"""

import os
import platform
import sys

# Instruction-set flags that change what TensorFlow's CPU kernels can do.
_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'avx512_fp16', 'amx_tile',
          'amx_bf16', 'amx_int8')


def _cpuinfo():
  """(model name, set of flags) from /proc/cpuinfo; the platform's guess elsewhere."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        key = key.strip()
        if key == 'model name':
          model = value.strip()
        elif key in ('flags', 'Features'):
          flags = set(value.split())
        if model and flags and key == '':  # The first processor's block is enough.
          break
  except OSError:
    pass
  return model, flags


def _onednn():
  """'on'/'off' once TensorFlow is imported (it decides at start-up), else unknown."""
  if 'tensorflow' not in sys.modules:
    return 'unknown'
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
    return 'on' if _pywrap_util_port.IsMklEnabled() else 'off'
  except (ImportError, AttributeError):
    return 'unknown'


def describe():
  """E.g. 'AMD EPYC, 2 cores, x86_64; avx2 fma (no avx512/amx); TF oneDNN off'."""
  model, flags = _cpuinfo()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  present = [f for f in _FLAGS if f in flags]
  missing = '' if any(f.startswith(('avx512', 'amx')) for f in present) else ' (no avx512/amx)'
  return (f'{model}, {cores} cores, {platform.machine()}; '
          f'{" ".join(present) or "none of " + "/".join(_FLAGS[:2])}{missing}; '
          f'TF oneDNN {_onednn()}')
