"""The only module that touches orbax: an async CheckpointManager wrapper.

Restores fall back from a corrupt or truncated latest checkpoint to the
previous one (with a warning) and move the unreadable step directories aside
to `checkpoints_unreadable/` (kept for inspection, never deleted; training
then rewrites those steps). If checkpoints exist but none can be read, the
run stops with an error and nothing is moved or deleted.

Layout: `<step>/default/` holds the TrainState (orbax StandardSave). Runs on
the host-fed grain pipeline (`Checkpointer(..., data_item=True)`) also save
`<step>/data/`, the input iterator's JSON state (data/pipeline.py
`Feed.state`), in the same atomic step: state and data position always come
from one step. Readers that only want the state (`runs.restore_state`, a
plain `Checkpointer`) read either layout.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

DATA = 'data'  # the item holding the input pipeline's JSON state


class CheckpointError(RuntimeError):
  """No usable checkpoint although some exist."""


class Checkpointer:
  """Saves / restores the TrainState pytree under `workdir/checkpoints`.

  With `data_item=True` every save also takes the input pipeline's JSON
  state (`save(..., data=...)`) and `restore_latest_with_data` returns it.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 2,
               data_item: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._data_item = data_item
    extra = ({'item_handlers': {'default': ocp.StandardCheckpointHandler(),
                                DATA: ocp.JsonCheckpointHandler()}}
             if data_item else {})
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=True), **extra)

  def all_steps(self) -> list[int]:
    """Steps with a saved checkpoint, ascending."""
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: Any, *, force: bool = False,
           data: dict[str, Any] | None = None) -> bool:
    """Async save of `state` (+ the pipeline's `data` state) at `step`.

    Returns whether a save started.
    """
    if not self._data_item:
      if data is not None:
        raise ValueError('Only Checkpointer(..., data_item=True) saves a data '
                         'state.')
      return self._mngr.save(step, args=ocp.args.StandardSave(state),
                             force=force)
    if data is None:
      raise ValueError('This Checkpointer saves the data state with every '
                       'step: pass data=.')
    return self._mngr.save(step, args=ocp.args.Composite(
        default=ocp.args.StandardSave(state), **{DATA: ocp.args.JsonSave(
            data)}), force=force)

  def reached_preemption(self, step: int) -> bool:
    """Whether `step` is a preemption sync point (save there, then exit)."""
    return self._mngr.reached_preemption(step)

  def restore_latest(self, target: Any) -> Any | None:
    """Newest readable checkpoint restored into `target`'s structure.

    Args:
      target: a pytree of arrays or jax.ShapeDtypeStruct with shardings.

    Returns:
      The restored state, or None when there is no checkpoint.

    Raises:
      CheckpointError: checkpoints exist, none is readable.
    """
    out = self.restore_latest_with_data(target)
    return None if out is None else out[0]

  def _restore(self, step: int, abstract: Any) -> tuple[Any, Any]:
    if not self._data_item:
      return self._mngr.restore(
          step, args=ocp.args.StandardRestore(abstract)), None
    items = self._mngr.item_metadata(step)
    args = {'default': ocp.args.StandardRestore(abstract)}
    if DATA in items:  # absent in checkpoints of the device path
      args[DATA] = ocp.args.JsonRestore()
    out = self._mngr.restore(step, args=ocp.args.Composite(**args))
    return out['default'], out.get(DATA)

  def restore_latest_with_data(self, target: Any
                               ) -> tuple[Any, dict[str, Any] | None] | None:
    """(state, data state or None) of the newest readable checkpoint.

    As `restore_latest`; the data state is None in checkpoints without one.
    """
    self._mngr.wait_until_finished()
    steps = self.all_steps()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    bad = []
    for step in reversed(steps):
      try:
        out = self._restore(step, abstract)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint step %d in %s is unreadable (%s: %s); '
                        'falling back to the previous one.', step,
                        self.directory, type(e).__name__, e)
        bad.append(step)
        continue
      if bad:
        self._quarantine(bad)
      return out
    if steps:
      raise CheckpointError(
          f'No readable checkpoint in {self.directory} (steps {steps}). '
          'Nothing was deleted; move the directory away to start fresh, or '
          'check that the config matches the run that wrote it.')
    return None

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unreadable step dirs to `checkpoints_unreadable/` (kept)."""
    if jax.process_index() == 0:
      dest = os.path.join(os.path.dirname(self.directory),
                          'checkpoints_unreadable')
      os.makedirs(dest, exist_ok=True)
      for step in steps:
        target = os.path.join(dest, f'{step}.{time.strftime("%Y%m%d-%H%M%S")}')
        shutil.move(os.path.join(self.directory, str(step)), target)
        logging.warning('Moved unreadable checkpoint step %d to %s.', step,
                        target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('onestep_bench_quarantine')
    self._mngr.reload()

  def wait(self) -> None:
    """Blocks until pending async saves have finished."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then closes the checkpoint manager."""
    self._mngr.wait_until_finished()
    self._mngr.close()
