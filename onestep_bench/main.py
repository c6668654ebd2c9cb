"""CLI: flags -> `train_and_evaluate(config, workdir)` -> results CSVs.

python -m onestep_bench.main \
    --config=experiments/bench.py:method=drifting,dataset=toy2d:8gaussians \
    [--config.train.num_steps=500] [--workdir=runs/...] [--results_dir=results]
"""

import linecache
import os
import shlex
import sys
import traceback
from collections.abc import Mapping
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import methods
import onestep_bench
from onestep_bench import checkpoint, config_check, runs, sharding, train
from onestep_bench.data.idx import IdxError
from onestep_bench.method import UnsupportedNFEError, method_module

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run dir (default: runs/'
                               '<method>/<dataset>/<protocol>_seed<k>).')
_RESULTS = flags.DEFINE_string('results_dir', 'results', "Where runs.csv and "
                               "leaderboards live; '' to record nothing.")


def main(argv: list[str]) -> None:
  """Validates the config, trains + evaluates, records the result rows."""
  del argv
  sharding.maybe_initialize_distributed()
  config = _CONFIG.value
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  config.protocol = protocol_after_overrides(config.protocol, overrides)
  command = reproducing_command(sys.argv[1:])
  try:
    # The whole config, before any data is built or anything compiles.
    config_check.validate(config, method_class(config))
    workdir = _WORKDIR.value or runs.default_workdir(
        config.method.name, config.data.name, config.seed, config.protocol)
    summary = train.train_and_evaluate(config, workdir, command=command)
  except Exception as e:  # pylint: disable=broad-except
    if not is_user_error(e):
      raise  # a bug: keep the traceback
    # Bad input / known failure: one line naming the fix, exit code 1, no
    # results rows (the CSVs are written only after a finished run).
    if os.environ.get('ONESTEP_TRACEBACK'):
      traceback.print_exc()
    sys.exit(f'error: {type(e).__name__}: {one_line(e)}')
  if jax.process_index() != 0:
    return
  if _RESULTS.value:
    from onestep_bench import results  # pylint: disable=g-import-not-at-top
    rows = results.record(summary, _RESULTS.value)
    logging.info('Recorded %d rows in %s', len(rows), _RESULTS.value)
  for rec in summary['evals']:
    m = rec['metrics']
    print(f'RESULT {summary["method"]} {summary["dataset"]} nfe={rec["nfe"]} '
          + ' '.join(f'{k}={v:.4g}' for k, v in m.items()
                     if isinstance(v, float)))


# Overrides under these top-level keys keep the protocol: evaluation settings
# (NFE, sample count, guidance) are recorded per row and never change what was
# trained; the mesh is placement, not maths; the seed is a row column.
PROTOCOL_NEUTRAL = frozenset({'evals', 'curve', 'mesh', 'seed'})
# Single keys that keep the protocol: `train.grad_accum` splits the same
# global batch into micro-batches (same update for per-sample-mean losses,
# methods that are not refuse it: config_check), so a paper run that needs
# it to fit memory is still that paper's protocol.
PROTOCOL_NEUTRAL_KEYS = frozenset({'train.grad_accum'})


def _flat_keys(overrides: Mapping[str, Any], prefix: str = '') -> set[str]:
  out = set()
  for k, v in overrides.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping) and v:
      out |= _flat_keys(v, key + '.')
    else:
      out.add(key)
  return out


def protocol_after_overrides(protocol: str, overrides: Mapping[str, Any]
                             ) -> str:
  """'custom' if any override is outside PROTOCOL_NEUTRAL(_KEYS).

  `config_flags.get_override_values` returns a nested dict in some versions
  and flat dotted keys ('evals.main.nfe') in others: both are handled.
  """
  keys = _flat_keys(overrides) - PROTOCOL_NEUTRAL_KEYS
  tops = {k.split('.', 1)[0] for k in keys}
  return protocol if tops <= PROTOCOL_NEUTRAL else 'custom'


def reproducing_command(argv: list[str]) -> str:
  """The command recorded with results, reproducible on any machine.

  Flags that only say where files go (--workdir, --results_dir) are dropped.
  """
  keep = [a for a in argv
          if not a.startswith(('--workdir', '--results_dir'))]
  return shlex.join(['python', '-m', 'onestep_bench.main', *keep])


def method_class(config) -> type:
  """`methods.<config.method.name>.Method`, imported, nothing built."""
  name = config.method.get('name') if 'method' in config else None
  return method_module(name).Method


# Failures the user can fix; each message names the fix (a missing dataset
# is a FileNotFoundError). Plus `raised_on_purpose` ValueErrors: the harness
# and plug-ins refuse bad input with `raise ValueError(...)` (or subclasses:
# f_distill's TeacherError, a backbone that does not fit the data, a mesh
# that does not fit the devices, a workdir of another config). Anything else
# -- a TypeError or ValueError deep in jax, a KeyError -- is a bug and keeps
# its traceback; ONESTEP_TRACEBACK=1 shows it for these too.
USER_ERRORS = (config_check.ConfigError, UnsupportedNFEError, IdxError,
               FileNotFoundError, checkpoint.CheckpointError,
               train.NonFiniteError, train.OutOfMemoryError)
_PROJECT_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                      for m in (onestep_bench, methods))


def raised_on_purpose(e: BaseException) -> bool:
  """Whether `e` comes from a `raise` statement in onestep_bench/ or methods/.

  The innermost frame of its traceback must be a `raise` line of this
  project, so a ValueError from inside jax / numpy / optax (a bug) does not
  count, even when called from project code.
  """
  tb = e.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  path = os.path.abspath(tb.tb_frame.f_code.co_filename)
  line = linecache.getline(path, tb.tb_lineno).lstrip()
  return path.startswith(_PROJECT_DIRS) and line.startswith('raise')


def is_user_error(e: BaseException) -> bool:
  """A failure the user can fix from its message (see USER_ERRORS)."""
  return isinstance(e, USER_ERRORS) or (isinstance(e, ValueError)
                                        and raised_on_purpose(e))


def one_line(e: BaseException) -> str:
  """The exception's message on one line."""
  return ' '.join(str(e).split()) or type(e).__name__


def config_error_in(e: BaseException | None) -> BaseException | None:
  """The ConfigError `e` wraps (cause / context chain), if any.

  config_flags re-raises errors of `get_config` as `type(e)(text)`, which a
  ConfigError's signature turns into a TypeError whose context is the
  original.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, config_check.ConfigError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def parse_or_exit(argv: list[str]) -> list[str]:
  """Parses flags; any bad input exits with one line naming the fix."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is None:
      raise ValueError('--config is required, e.g. '
                       '--config=experiments/bench.py:method=flow_matching')
    return rest
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    # Flag / config-file parsing only runs user input: every failure here is
    # one line (the config code is `get_config`, not training).
    bad = config_error_in(e)
    if bad is not None:
      sys.exit(f'error: ConfigError: {one_line(bad)}')
    cause = e.__cause__ or e.__context__ or e
    lines = [ln for ln in str(cause).splitlines() if ln.strip()]
    msg = (lines[-1] if lines else type(cause).__name__).strip()
    if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in '"\'':
      msg = msg[1:-1]  # absl quotes some messages
    if isinstance(cause, (KeyError, AttributeError)):
      msg = (f'unknown config key {msg!r}: check the spelling against '
             'experiments/bench.py and methods/<name>.py:get_config()')
    sys.exit(f'error: {msg}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_or_exit)
