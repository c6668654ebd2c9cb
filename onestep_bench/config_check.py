"""One validation pass over a run config, before anything compiles.

`validate(config, method)` checks the harness keys (data, model, train, every
eval, mesh) and then calls the method's own `Method.validate_config` hook.
Every problem raises `ConfigError`, whose message names the key, the value,
the allowed range and the fix, so the CLI can print it as one `error:` line.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
  """A config value the run cannot use; the message says how to fix it.

  Attributes:
    key: dotted config key, e.g. 'train.lr' (shown as `config.train.lr`).
    value: the offending value.
    allowed: the allowed range / set, in words.
    fix: what to do instead.
  """

  def __init__(self, key: str, value: Any, allowed: str, fix: str = ''):
    self.key, self.value, self.allowed, self.fix = key, value, allowed, fix
    msg = f'config.{key}={value!r}: {allowed}.'
    if fix:
      msg += f' Fix: {fix}'
    super().__init__(msg)
