"""CLI: flags -> `train_and_evaluate(config, workdir)` -> results CSVs.

python -m onestep_bench.main \
    --config=experiments/bench.py:method=drifting,dataset=toy2d:8gaussians \
    [--config.train.num_steps=500] [--workdir=runs/...] [--results_dir=results]
"""

import os
import shlex
import sys
import traceback
from collections.abc import Mapping
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from onestep_bench import checkpoint, sharding, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run dir (default: runs/'
                               '<method>/<dataset>/<protocol>_seed<k>).')
_RESULTS = flags.DEFINE_string('results_dir', 'results', "Where runs.csv and "
                               "leaderboards live; '' to record nothing.")


def main(argv):
  del argv
  sharding.maybe_initialize_distributed()
  config = _CONFIG.value
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  config.protocol = protocol_after_overrides(config.protocol, overrides)
  workdir = _WORKDIR.value or os.path.join(
      'runs', config.method.name, config.data.name.replace(':', '_'),
      f'{config.protocol}_seed{config.seed}')
  command = reproducing_command(sys.argv[1:])
  try:
    summary = train.train_and_evaluate(config, workdir, command=command)
  except USER_ERRORS as e:
    # Bad input / known failure: one line naming the fix, exit code 1, no
    # results rows (the CSVs are written only after a finished run).
    if os.environ.get('ONESTEP_TRACEBACK'):
      traceback.print_exc()
    sys.exit(f'error: {type(e).__name__}: {one_line(e)}')
  if jax.process_index() != 0:
    return
  if _RESULTS.value:
    from onestep_bench import leaderboard  # pylint: disable=g-import-not-at-top
    rows = leaderboard.record(summary, _RESULTS.value)
    logging.info('Recorded %d rows in %s', len(rows), _RESULTS.value)
  for rec in summary['evals']:
    m = rec['metrics']
    print(f'RESULT {summary["method"]} {summary["dataset"]} nfe={rec["nfe"]} '
          + ' '.join(f'{k}={v:.4g}' for k, v in m.items()
                     if isinstance(v, float)))


# Overrides under these top-level keys keep the protocol: evaluation settings
# (NFE, sample count, guidance) are recorded per row and never change what was
# trained; the mesh is placement, not maths; the seed is a row column.
PROTOCOL_NEUTRAL = frozenset({'evals', 'mesh', 'seed'})


def protocol_after_overrides(protocol: str, overrides: Mapping[str, Any]
                             ) -> str:
  """'custom' if any override (flat dotted key) is outside PROTOCOL_NEUTRAL.

  `config_flags.get_override_values` returns a nested dict in some versions
  and flat dotted keys ('evals.main.nfe') in others: both are handled.
  """
  tops = {str(k).split('.', 1)[0] for k in overrides}
  return protocol if tops <= PROTOCOL_NEUTRAL else 'custom'


def reproducing_command(argv: list[str]) -> str:
  """The command recorded with results: flags that only say where files go
  (--workdir, --results_dir) are dropped, so it reproduces on any machine."""
  keep = [a for a in argv
          if not a.startswith(('--workdir', '--results_dir'))]
  return shlex.join(['python', '-m', 'onestep_bench.main', *keep])


# Failures the user can fix; each message names the fix (config errors,
# UnsupportedNFEError, IdxError and TeacherError are ValueErrors; a missing
# dataset is a FileNotFoundError). Anything else is a bug and keeps its
# traceback; ONESTEP_TRACEBACK=1 shows it for these too.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError,
               checkpoint.CheckpointError, train.NonFiniteError,
               train.OutOfMemoryError)


def one_line(e: BaseException) -> str:
  """The exception's message on one line."""
  return ' '.join(str(e).split()) or type(e).__name__


def parse_or_exit(argv: list[str]) -> list[str]:
  """Parses flags; any bad input exits with one line naming the fix."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is None:
      raise ValueError('--config is required, e.g. '
                       '--config=experiments/bench.py:method=flow_matching')
    return rest
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    cause = e.__cause__ or e.__context__ or e
    lines = [ln for ln in str(cause).splitlines() if ln.strip()]
    msg = (lines[-1] if lines else type(cause).__name__).strip('"\'')
    if isinstance(cause, (KeyError, AttributeError)):
      msg = (f'unknown config key {msg!r}: check the spelling against '
             'experiments/bench.py and methods/<name>.py:get_config()')
    sys.exit(f'error: {msg}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_or_exit)
