"""Matmul / convolution FLOPs of a JAX function, counted on its jaxpr.

XLA's `compiled.cost_analysis()` counts a `while` body once, so a sampler
that scans over its NFE steps reports the same FLOPs at NFE 1 and NFE 100
(measured). This counter walks the jaxpr instead and multiplies `scan`
bodies by their length, so sampling FLOPs and "effective NFE" (sampling
FLOPs / one backbone forward) are right for every method.

Counted: `dot_general` (2·|out|·|contracted|) and `conv_general_dilated`
(2·|out|·|kernel| / out_features), the terms MFU is defined on; elementwise
ops are not counted. `while` loops with unknown trip counts count once and
set `exact=False`; `cond` counts its most expensive branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jax_core


def _sub_jaxprs(eqn: Any) -> list[tuple[Any, float]]:
  """(jaxpr, multiplier) pairs nested in an equation's params."""
  p = eqn.params
  name = eqn.primitive.name
  if name == 'scan':
    return [(p['jaxpr'], float(p['length']))]
  if name == 'cond':
    return [(max(p['branches'], key=lambda b: _count(b)[0]), 1.0)]
  out = []
  for v in p.values():
    for j in (v if isinstance(v, (list, tuple)) else [v]):
      if isinstance(j, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
        out.append((j, 1.0))
  return out


def _eqn_flops(eqn: Any) -> float:
  name = eqn.primitive.name
  if name == 'dot_general':
    (lc, _), _ = eqn.params['dimension_numbers']
    lhs = eqn.invars[0].aval.shape
    contracted = math.prod(lhs[d] for d in lc)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted
  if name == 'conv_general_dilated':
    rhs = eqn.invars[1].aval.shape
    out_dim = eqn.params['dimension_numbers'].rhs_spec[0]
    return (2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs)
            / rhs[out_dim])
  return 0.0


def _count(jaxpr: Any) -> tuple[float, bool]:
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total, exact = 0.0, True
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    if eqn.primitive.name == 'while':
      exact = False
    for sub, mult in _sub_jaxprs(eqn):
      f, e = _count(sub)
      total += mult * f
      exact &= e
  return total, exact


def count_flops(fn: Callable[..., Any], *args: Any,
                **kwargs: Any) -> tuple[float, bool]:
  """(matmul + conv FLOPs of fn(*args), exact) from its jaxpr."""
  return _count(jax.make_jaxpr(fn, **kwargs)(*args))
