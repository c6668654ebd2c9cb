"""Metric writers with clu's `MetricWriter` method names, TensorFlow-free.

`clu.metric_writers` imports TensorFlow, so the default writer here is a JSONL
file (one `{"step": s, **scalars}` object per line) plus the absl log; a
TensorBoard writer from clu is added only when TensorFlow is installed
(extra `[tb]`) and `use_tensorboard=True`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging


def _py(v: Any) -> Any:
  a = np.asarray(v)
  return a.item() if a.ndim == 0 else a.tolist()


class JsonlWriter:
  """Appends scalars to `workdir/metrics.jsonl` (clu MetricWriter API).

  Line-buffered, so a killed run loses at most the line being written; a torn
  last line from such a kill is cut off when the resumed run reopens the
  file. A resumed run re-logs the steps after its checkpoint: readers keep
  the last record per step.
  """

  def __init__(self, path: str):
    self.path = path
    if os.path.exists(path):
      with open(path, 'rb+') as f:
        data = f.read()
        if data and not data.endswith(b'\n'):
          f.truncate(data.rfind(b'\n') + 1)
    self._f = open(path, 'a', encoding='utf-8', buffering=1)  # pylint: disable=consider-using-with

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends one `{"step": step, **scalars}` JSON line."""
    record = {'step': int(step), **{k: _py(v) for k, v in scalars.items()}}
    self._f.write(json.dumps(record) + '\n')

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Appends one `{"hparams": {...}}` JSON line, values as strings."""
    self._f.write(json.dumps({'hparams': {k: str(v) for k, v in
                                          hparams.items()}}) + '\n')

  def flush(self) -> None:
    """Flushes buffered output to the JSONL file."""
    self._f.flush()

  def close(self) -> None:
    """Closes the JSONL file."""
    self._f.close()


class LogWriter:
  """Scalars to the absl log (clu `LoggingWriter` equivalent)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs `scalars` at `step` as one sorted `key=value` line."""
    logging.info('[%d] %s', step, ', '.join(
        f'{k}={_py(v):.4g}' if np.ndim(v) == 0 else f'{k}={_py(v)}'
        for k, v in sorted(scalars.items())))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Ignores hparams (not logged)."""
    del hparams

  def flush(self) -> None:
    """No-op: the log needs no flushing."""

  def close(self) -> None:
    """No-op: nothing to close."""


class MultiWriter:
  """Fans every call out to several writers."""

  def __init__(self, writers: list[Any]):
    self.writers = writers

  def __getattr__(self, name: str):
    def call(*args, **kwargs):
      for w in self.writers:
        getattr(w, name)(*args, **kwargs)
    return call


def create_writer(workdir: str, *, is_main: bool,
                  use_tensorboard: bool = False) -> MultiWriter:
  """JSONL + log writers on process 0; nothing elsewhere."""
  if not is_main:
    return MultiWriter([])
  writers: list[Any] = [JsonlWriter(os.path.join(workdir, 'metrics.jsonl')),
                        LogWriter()]
  if use_tensorboard:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    writers.append(metric_writers.SummaryWriter(workdir))
  return MultiWriter(writers)
