"""The ranked-board campaign as data: every step the seeded boards need.

The boards rank methods over seeds 0, 1, 2 under two protocols (`bench` =
papers' defaults, `tuned` = the declared procedure's winner,
experiments/tuning.py): toy sets and digits under both, the peer toy
sets and Fashion-MNIST under `bench`. This module declares every step that
fills them and runs the missing ones; its state is what `results/` holds,
so a campaign interrupted anywhere (even by the loss of the machine with
its run dirs) goes on from the committed results:

  python -m experiments.campaign status             # done / missing, CPU-h
  python -m experiments.campaign run [--only=digits] [--max_steps=N]
                                    [--hours=H]   # time this machine has left

  step                      done when
  tune M on images          results/tuning/images/M.json exists
  run M D seed S protocol   results/runs.csv has its `main` rows from
                            committed code (git_sha without '+dirty')

`run` takes the first missing step whose prerequisites hold (a `tuned` run
needs its family's winner, committed in the checkout it runs in), claims
it (an O_EXCL file under runs/campaign/claims, with the owner's pid, so
several `run` processes, e.g. one per core, share the list without doing
a step twice), and runs it as a subprocess of the normal CLI
(`onestep_bench.main`, `onestep_bench.tuning`), logging to
runs/campaign/logs/. A distillation
student (`TEACHER_METHOD`) first gets its teacher's bench run dir back if
it is gone: the teacher is retrained (deterministic; its rows are
recorded again and the board keeps the newest). Tuning runs on
the images family only; the toy family's winners are committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from onestep_bench.csvstore import read_csv
from onestep_bench.method import available_methods, method_module
from onestep_bench.tuning import winner_path

SEEDS = (0, 1, 2)
TOY = ('toy2d:8gaussians', 'toy2d:8gaussians_imbalanced',
       'toy2d:checkerboard')
# The peer-comparable toy sets (data/toy2d.py: torchcfm's 8 Gaussians,
# the Drifting demo's checkerboard): bench only, as the peers run defaults.
PEER_TOY = ('toy2d:8gaussians_torchcfm', 'toy2d:checkerboard_drifting')
BOTH = ('bench', 'tuned')
# (datasets, protocols): the seeded boards.
BOARDS = ((TOY, BOTH), (PEER_TOY, ('bench',)), (('digits',), BOTH),
          (('fashion_mnist',), ('bench',)))
TUNE_FAMILY = 'images'
CLAIMS = os.path.join('runs', 'campaign', 'claims')
LOGS = os.path.join('runs', 'campaign', 'logs')


@dataclasses.dataclass(frozen=True)
class Step:
  """One campaign step: `tune` (dataset = the family) or `run`."""
  kind: str
  method: str
  dataset: str
  seed: int = 0
  protocol: str = 'bench'

  @property
  def name(self) -> str:
    """Unique, file-name safe (claims and logs are named by it)."""
    if self.kind == 'tune':
      return f'tune_{self.method}_{self.dataset}'
    return (f'{self.method}_{self.dataset.replace(":", "_")}_'
            f'{self.protocol}_seed{self.seed}')

  def command(self, results_dir: str) -> list[str]:
    """The CLI call that performs the step."""
    if self.kind == 'tune':
      return [sys.executable, '-m', 'onestep_bench.tuning',
              f'--method={self.method}', f'--family={self.dataset}',
              f'--results_dir={results_dir}']
    cfg = (f'experiments/bench.py:method={self.method},dataset='
           f'{self.dataset},seed={self.seed}')
    if self.protocol != 'bench':
      cfg += f',protocol={self.protocol}'
    return [sys.executable, '-m', 'onestep_bench.main', f'--config={cfg}',
            f'--results_dir={results_dir}']


def teacher_of(method: str) -> str | None:
  """The method's declared teacher (`TEACHER_METHOD`), if any."""
  return getattr(method_module(method), 'TEACHER_METHOD', None)


def steps(methods: Sequence[str] | None = None) -> list[Step]:
  """Every step, in run order.

  Teachers come before students (per dataset and seed) and the images
  tuning before the image runs that need it.
  """
  ms = sorted(methods or available_methods(),
              key=lambda m: (teacher_of(m) is not None, m))
  out = [Step('tune', m, TUNE_FAMILY) for m in ms]
  for datasets, protocols in BOARDS:
    for ds in datasets:
      for seed in SEEDS:
        for p in protocols:
          out += [Step('run', m, ds, seed, p) for m in ms]
  return out


def _done_runs(results_dir: str) -> set[tuple[str, str, int, str]]:
  return {(r['method'], r['dataset'], int(r['seed']), r['protocol'])
          for r in read_csv(os.path.join(results_dir, 'runs.csv'))
          if r['eval'] == 'main' and not r['git_sha'].endswith('+dirty')}


def is_done(step: Step, results_dir: str,
            done_runs: set[tuple[str, str, int, str]]) -> bool:
  """Whether `results_dir` holds the step's result (`_done_runs` rows)."""
  if step.kind == 'tune':
    return os.path.exists(winner_path(step.method, step.dataset, results_dir))
  return (step.method, step.dataset, step.seed, step.protocol) in done_runs


# The run reads its winner from the checkout it runs in (cwd `results/`,
# `tuning.tuned_overrides`), i.e. from the committed tree of its code.
CHECKOUT_RESULTS = 'results'


def ready(step: Step, results_dir: str) -> bool:
  """Prerequisites: a `tuned` image run needs the images winner.

  In `results_dir` (the tuning step is done) and in this checkout, which
  is where the run reads it: a winner written to another results_dir but
  not yet in the checkout would fail the run after its start.
  """
  if step.kind == 'run' and step.protocol == 'tuned' and \
      not step.dataset.startswith('toy2d'):
    winner = Step('tune', step.method, TUNE_FAMILY)
    return all(is_done(winner, d, set())
               for d in (results_dir, CHECKOUT_RESULTS))
  return True


def waiting_for_checkout(todo: Sequence[Step], results_dir: str
                         ) -> list[str]:
  """Steps of `todo` whose winner is in `results_dir`, not the checkout."""
  return [s.name for s in todo
          if not ready(s, results_dir) and is_done(
              Step('tune', s.method, TUNE_FAMILY), results_dir, set())]


def missing(results_dir: str = 'results', only: str = '',
            methods: Sequence[str] | None = None) -> list[Step]:
  """The steps not done, in run order (`only`: a name substring)."""
  done = _done_runs(results_dir)
  return [s for s in steps(methods) if not is_done(s, results_dir, done)
          and (not only or only in s.name)]


# CPU seconds of one FM bench run where no row of the dataset is committed
# yet (experiments/bench.py: digits ~7 min, Fashion-MNIST ~15 min, 2 cores).
DECLARED_S = {'digits': 420.0, 'fashion_mnist': 900.0}


def estimate_s(step: Step, results_dir: str = 'results') -> float:
  """CPU seconds of a step, from the committed rows' `train_wall_s`.

  The method's median on the dataset; else the dataset's declared FM
  time times the method's cost relative to FM on the datasets both ran.
  Tuning = K runs on the dev set.
  """
  from experiments import tuning as spec  # pylint: disable=g-import-not-at-top
  wall: dict[tuple[str, str], list[float]] = {}
  for r in read_csv(os.path.join(results_dir, 'runs.csv')):
    if r['eval'] == 'main' and r['train_wall_s']:
      wall.setdefault((r['method'], r['dataset']), []).append(
          float(r['train_wall_s']))
  ds = spec.DEV_SETS[step.dataset] if step.kind == 'tune' else step.dataset
  k = spec.K_TRIALS if step.kind == 'tune' else 1
  if (step.method, ds) in wall:
    return k * statistics.median(wall[step.method, ds])
  ratios = [statistics.median(v) / statistics.median(wall[
      'flow_matching', d]) for (m, d), v in wall.items()
            if m == step.method and ('flow_matching', d) in wall]
  fm = (statistics.median(wall['flow_matching', ds])
        if ('flow_matching', ds) in wall else DECLARED_S.get(ds, 0.0))
  return k * fm * (statistics.median(ratios) if ratios else 1.0)


def claim(step: Step) -> bool:
  """Takes the step for this process; False if a live process holds it.

  O_EXCL creation decides between racing processes; a claim whose owner
  is dead (killed, or gone with its machine) is removed and retaken.
  """
  os.makedirs(CLAIMS, exist_ok=True)
  path = os.path.join(CLAIMS, step.name)
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      if _owner_alive(path):
        return False
      try:
        os.remove(path)
      except FileNotFoundError:
        pass
      continue
    with os.fdopen(fd, 'w') as f:
      f.write(str(os.getpid()))
    return True
  return False


def release(step: Step) -> None:
  """Drops this process's claim of the step."""
  try:
    os.remove(os.path.join(CLAIMS, step.name))
  except FileNotFoundError:
    pass


def _owner_alive(path: str) -> bool:
  try:
    with open(path, encoding='utf-8') as f:
      pid = int(f.read() or 0)
    if pid <= 0:
      return False
    os.kill(pid, 0)
  except (FileNotFoundError, ValueError, ProcessLookupError):
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _execute(step: Step, results_dir: str) -> int:
  os.makedirs(LOGS, exist_ok=True)
  with open(os.path.join(LOGS, f'{step.name}.log'), 'a',
            encoding='utf-8') as log:
    return subprocess.call(step.command(results_dir), stdout=log,
                           stderr=subprocess.STDOUT)


def _teacher_step(step: Step) -> Step | None:
  """The teacher's bench run, if the student needs it and its dir is gone."""
  from onestep_bench import runs  # pylint: disable=g-import-not-at-top
  teacher = teacher_of(step.method) if step.kind == 'run' else None
  if teacher is None:
    return None
  wd = runs.default_workdir(teacher, step.dataset, step.seed)
  if os.path.exists(os.path.join(wd, 'summary.json')):
    return None
  return Step('run', teacher, step.dataset, step.seed, 'bench')


def _take(todo: Sequence[Step], results_dir: str
          ) -> tuple[Step, Step | None] | None:
  """Claims the first free step (and its teacher, if it must be retrained)."""
  for step in todo:
    if not claim(step):
      continue
    if is_done(step, results_dir, _done_runs(results_dir)):
      release(step)  # another process finished it since `todo` was read
      continue
    teacher = _teacher_step(step)
    if teacher and not claim(teacher):
      release(step)  # its teacher is being trained elsewhere
      continue
    return step, teacher
  return None


def run(results_dir: str = 'results', only: str = '',
        max_steps: int | None = None, execute=_execute,
        wait_s: float = 60.0,
        methods: Sequence[str] | None = None,
        hours: float | None = None) -> list[str]:
  """Runs missing steps until none is left (or `max_steps`).

  Returns the names it ran. A failed step is reported and not retried by
  this call; while only steps held by other processes are left, it waits.
  `hours`: the time this machine has left; a step is started only if its
  estimate (`estimate_s`, for tuning one trial, as trials are durable)
  fits what remains, so no CPU goes to a step lost unfinished.
  """
  from experiments.tuning import K_TRIALS  # pylint: disable=g-import-not-at-top
  deadline = None if hours is None else time.time() + 3600 * hours

  def fits(s: Step) -> bool:
    if deadline is None:
      return True
    est = estimate_s(s, results_dir) / (K_TRIALS if s.kind == 'tune' else 1)
    return time.time() + est <= deadline

  if wait := waiting_for_checkout(missing(results_dir, only, methods),
                                  results_dir):
    print(f'campaign: {_checkout_note(wait, results_dir)}', flush=True)
  ran: list[str] = []
  failed: set[str] = set()
  while max_steps is None or len(ran) < max_steps:
    todo = [s for s in missing(results_dir, only, methods)
            if s.name not in failed
            and ready(s, results_dir) and fits(s)]
    if not todo:
      break
    taken = _take(todo, results_dir)
    if taken is None:  # all held elsewhere (or their teachers are)
      time.sleep(wait_s)
      continue
    step, teacher = taken
    for s in ([teacher] if teacher else []) + [step]:
      print(f'campaign: {s.name}', flush=True)
      rc = execute(s, results_dir)
      ran.append(s.name)
      if rc:
        print(f'campaign: {s.name} failed (rc {rc}); see '
              f'{LOGS}/{s.name}.log', flush=True)
        failed.add(step.name)
        break
    for s in ([teacher] if teacher else []) + [step]:
      release(s)
  return ran


def status(results_dir: str = 'results', only: str = '') -> str:
  """What is left, with the CPU-hour estimate per board."""
  todo = missing(results_dir, only)
  by: dict[str, list[float]] = {}
  for s in todo:
    key = 'tune images' if s.kind == 'tune' else f'{s.dataset} {s.protocol}'
    by.setdefault(key, []).append(estimate_s(s, results_dir))
  lines = [f'{len(steps()) - len(todo)} of {len(steps())} steps done; '
           f'{len(todo)} missing, about '
           f'{sum(map(sum, by.values())) / 3600:.1f} CPU-h:']
  lines += [f'  {k:<36} {len(v):>3} steps  {sum(v) / 3600:5.1f} h'
            for k, v in by.items()]
  if wait := waiting_for_checkout(todo, results_dir):
    lines.append(_checkout_note(wait, results_dir))
  return '\n'.join(lines)


def _checkout_note(names: Sequence[str], results_dir: str) -> str:
  return (f'{len(names)} tuned steps wait for their winner in this checkout '
          f'(it is in {results_dir}/tuning, not in {CHECKOUT_RESULTS}/tuning): '
          'commit it and move this checkout to that commit. '
          f'{", ".join(names[:3])}{", ..." if len(names) > 3 else ""}')


def main(argv: Sequence[str] | None = None) -> None:
  """CLI (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('action', choices=('status', 'run'))
  p.add_argument('--results_dir', default='results')
  p.add_argument('--only', default='',
                 help='substring of step names, e.g. digits, tune, seed2')
  p.add_argument('--max_steps', type=int, default=None)
  p.add_argument('--hours', type=float, default=None,
                 help='time left on this machine: start only steps that fit')
  a = p.parse_args(argv)
  if a.action == 'status':
    print(status(a.results_dir, a.only))
  else:
    run(a.results_dir, a.only, a.max_steps, hours=a.hours)


if __name__ == '__main__':
  main()
