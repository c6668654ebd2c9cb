"""Crash- and concurrency-safe CSV files: locked appends, atomic rewrites.

`atomic_append` takes an exclusive `fcntl.flock` on `<path>.lock`, writes the
old content plus the new rows to a temp file in the same directory, fsyncs it
and `os.replace`s it over the file: concurrent writers never lose or tear
rows, and readers always see a complete file. A header that differs from the
expected columns is refused (schemas are never mixed), except a file whose
columns are all among the expected ones: it is migrated in the same atomic
rewrite (its rows get '' in the new columns; no value is dropped or moved).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
  """Exclusive fcntl lock on `path + '.lock'` (serializes all writers)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path + '.lock', 'a', encoding='utf-8') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` via a temp file in the same dir + os.replace."""
  d = os.path.dirname(path) or '.'
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix='.' + os.path.basename(path),
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from others.
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str],
             header: bool = True) -> str:
  """`rows` as CSV text with `columns` (unknown keys raise ValueError)."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, list(columns), lineterminator='\n')
  if header:
    w.writeheader()
  w.writerows(rows)  # Unknown keys raise ValueError; missing ones are ''.
  return buf.getvalue()


def read_csv(path: str) -> list[dict[str, str]]:
  """Rows of a CSV file as dicts ([] if the file does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8', newline='') as f:
    return list(csv.DictReader(f))


def atomic_append(path: str, rows: list[dict[str, Any]],
                  columns: list[str]) -> None:
  """Appends `rows` to the CSV at `path`; safe under concurrent writers.

  An existing file whose header is a proper subset of `columns` (a column
  was added since it was written) is rewritten in `columns`' order first,
  its old rows with '' in the new columns.

  Raises:
    ValueError: the existing header has a column not in `columns` or a
      repeated one, or a row has a key that is not a column.
  """
  new = csv_text(rows, columns, header=False)  # Validate before locking.
  with locked(path):
    old = ''
    if os.path.exists(path):
      with open(path, encoding='utf-8', newline='') as f:
        old = f.read()
    if old:
      header = next(csv.reader(io.StringIO(old)))
      if len(set(header)) == len(header) and set(header) < set(columns):
        old = csv_text(csv.DictReader(io.StringIO(old)), columns)
        header = list(columns)
      if header != list(columns):
        raise ValueError(
            f'{path} has columns {header}, expected {list(columns)}; refusing '
            'to mix schemas. Move the old file aside (or migrate it) first.')
      old += '' if old.endswith('\n') else '\n'
    else:
      old = csv_text([], columns)
    atomic_write(path, old + new)
