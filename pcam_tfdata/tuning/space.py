"""The search space file of `pcam-tune --space`: which `pcam-train` flags a search draws, and how.

One searched flag per line, `NAME: KIND ARGS`:

    # The seed's CNNs (configs/space_seed.space).
    learning_rate: loguniform 1e-4 1e-2
    batch_size: choice 32 64 128
    stain_jitter: uniform 0 0.1
    warmup_epochs: int 0 2

KIND is `uniform LOW HIGH`, `loguniform LOW HIGH` (LOW > 0), `int LOW HIGH`
(both ends included, as Optuna's) or `choice V1 V2 ...`; `#` starts a
comment. Every flag not named is fixed, at its value on the command line.

TensorFlow- and Optuna-free: the file is checked before any study exists,
every value against `pcam-train`'s own checks (`config.check_config`), at
both ends of a range and for each choice, with the fixed flags beside it.
"""

import dataclasses
import math
import re

from pcam_tfdata.training import config as config_lib

KINDS = ('uniform', 'loguniform', 'int', 'choice')
# pcam-train flags a search may not draw: where the data and the run live,
# the search's own seed, and switches that change nothing learned.
NOT_SEARCHED = ('records_dir', 'model_dir', 'seed', 'restart', 'progress', 'profile_steps',
                'data_service_address', 'eval_batch_size')


def flag_types():
  """{flag name: bool, int, float or str} of every searchable `pcam-train` flag."""
  types = {}
  for field in dataclasses.fields(config_lib.Config):
    if field.name in NOT_SEARCHED:
      continue
    default = field.default
    types[field.name] = float if default is None else type(default)  # (None: --dropout.)
  return types


@dataclasses.dataclass(frozen=True)
class Param:
  """One searched flag: `name: kind args`, from line `line` of the file."""
  name: str
  kind: str
  args: tuple  # (low, high) for ranges, the typed values for a choice.
  line: int = 0
  path: str = '<space>'  # The file it came from, for messages.

  def text(self):
    """The line as written back (normalized): what a study records of its space."""
    return f'{self.name}: {self.kind} {" ".join(_format(a) for a in self.args)}'


class SpaceError(ValueError):
  """A bad line: the message names the file and line."""


def _format(value):
  if isinstance(value, bool):
    return 'true' if value else 'false'
  return repr(value) if isinstance(value, float) else str(value)


def _parse_value(text, kind, where, name):
  if kind is bool:
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise SpaceError(f'{where}: --{name} is true or false, not {text!r}')
  try:
    value = kind(text)
  except ValueError:
    raise SpaceError(f'{where}: --{name} takes {kind.__name__} values, not {text!r}') from None
  if kind is float and not math.isfinite(value):
    raise SpaceError(f'{where}: --{name}: {text} is not a finite number')
  return value


def parse(text, path='<space>'):
  """[Param] of a space file's text.

  Raises:
    SpaceError: a line that is not `NAME: KIND ARGS`, an unknown or
      unsearchable flag, a flag named twice, a bad range or value.
  """
  types = flag_types()
  params, seen = [], {}
  for number, raw in enumerate(text.splitlines(), 1):
    line = raw.split('#', 1)[0].strip()
    if not line:
      continue
    where = f'{path}:{number}'
    match = re.fullmatch(r'-{0,2}([A-Za-z_]\w*)\s*:\s*(\w+)\s*(.*)', line)
    if not match:
      raise SpaceError(f'{where}: expected NAME: KIND ARGS (KIND one of {", ".join(KINDS)}), '
                       f'got {line!r}')
    name, kind, args = match[1], match[2], match[3].split()
    if name not in types:
      why = ('is not searched (the search sets it)' if name in NOT_SEARCHED
             else 'is not a pcam-train flag')
      raise SpaceError(f'{where}: --{name} {why}')
    if name in seen:
      raise SpaceError(f'{where}: --{name} is already searched on line {seen[name]}')
    seen[name] = number
    params.append(dataclasses.replace(_param(name, kind, args, types[name], where, number),
                                      path=path))
  if not params:
    raise SpaceError(f'{path}: no searched flag (expected lines NAME: KIND ARGS)')
  return params


def _param(name, kind, args, flag_type, where, number):
  if kind not in KINDS:
    raise SpaceError(f'{where}: unknown kind {kind!r}; choose one of {", ".join(KINDS)}')
  if kind == 'choice':
    if not args:
      raise SpaceError(f'{where}: choice needs at least one value')
    values = tuple(_parse_value(a, flag_type, where, name) for a in args)
    if len(set(values)) != len(values):
      raise SpaceError(f'{where}: --{name}: a value is listed twice')
    return Param(name, kind, values, number)
  if len(args) != 2:
    raise SpaceError(f'{where}: {kind} takes LOW HIGH, got {len(args)} values')
  if flag_type not in (float, int):
    raise SpaceError(f'{where}: --{name} takes {flag_type.__name__} values; use choice')
  number_type = int if kind == 'int' else float
  low, high = (_parse_value(a, number_type, where, name) for a in args)
  if kind in ('uniform', 'loguniform') and flag_type is int:
    raise SpaceError(f'{where}: --{name} takes whole numbers; use int or choice')
  if not low < high:
    raise SpaceError(f'{where}: --{name}: LOW {args[0]} must be below HIGH {args[1]}')
  if kind == 'loguniform' and low <= 0:
    raise SpaceError(f'{where}: --{name}: loguniform needs LOW > 0, got {args[0]}')
  return Param(name, kind, (low, high), number)


def check(params, fixed):
  """Checks each value a search may draw as `pcam-train` would, with the fixed flags beside it.

  A value passes if pcam-train takes it with the other searched flags at
  their defaults, at their first or at their last values (`weights:
  imagenet` needs a searched `model` that has weights); a refusal names the
  line of the value no such neighbour saves. (A combination the sampler may
  still draw, and pcam-train refuse, fails that one trial, in one line.)

  Args:
    params: [Param].
    fixed: {flag: value} of the other settings (a `Config`'s fields).

  Raises:
    SpaceError: naming the file, the line and pcam-train's objection.
  """
  searched = {p.name for p in params}
  fixed = {k: v for k, v in fixed.items() if k not in searched}
  for param in params:
    others = [p for p in params if p is not param]
    neighbours = [{}, {p.name: p.args[0] for p in others}, {p.name: p.args[-1] for p in others}]
    for value in param.args:
      errors = []
      for neighbour in neighbours:
        config = config_lib.Config(**{'records_dir': '', 'model_dir': '', **fixed, **neighbour,
                                      param.name: value})
        try:
          config_lib.check_config(config)
          break
        except ValueError as e:
          errors.append(e)
      else:
        raise SpaceError(f'{param.path}:{param.line}: {param.name}={_format(value)}: '
                         f'pcam-train refuses it ({errors[0]})')


def distributions(params):
  """{name: optuna distribution} of the space (imports Optuna)."""
  import optuna  # pylint: disable=g-import-not-at-top
  out = {}
  for p in params:
    if p.kind == 'choice':
      out[p.name] = optuna.distributions.CategoricalDistribution(p.args)
    elif p.kind == 'int':
      out[p.name] = optuna.distributions.IntDistribution(*p.args)
    else:
      out[p.name] = optuna.distributions.FloatDistribution(*p.args, log=p.kind == 'loguniform')
  return out


def read(path):
  """[Param] of the space file at `path` (SpaceError naming it when unreadable)."""
  try:
    with open(path) as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise SpaceError(f'{path}: cannot read the space file ({e.__class__.__name__}: '
                     f'{getattr(e, "strerror", None) or e})') from None
  return parse(text, path)
