"""Maths tests of the DTM method (docs/methods/transition_matching.md
§2.3, §2.9).

Closed form used throughout (data x ~ N(μ, Σ), noise e ~ N(0, I), paper time
τ: X_τ = (1 - τ) e + τ x, Y = x - e), all matrices polynomials in Σ:
  Cov(X_τ) = (1-τ)² I + τ² Σ,  Cov(Y, X_τ) = τ Σ - (1-τ) I,  Cov(Y) = Σ + I,
  p(Y | X_τ = z) = N(μ + G (z - τμ), Σ + I - G Cov(Y, X_τ)),
  G = Cov(Y, X_τ) Cov(X_τ)⁻¹.
The exact head for a Gaussian target N(m, C) on the path
Y_s = (1 - s) Y_0 + s Y is u(y, s) = m + (sC - (1-s)I)((1-s)²I + s²C)⁻¹
(y - s m).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smoke_config

from methods import transition_matching as tm
from onestep_bench import data
from onestep_bench.data import DataSpec
from onestep_bench.evaluators import runner
from onestep_bench.flops import count_flops
from onestep_bench.method import UnsupportedNFEError, load_method


def _setup(dataset='toy2d:gaussian', spec=None, **kw):
  config = smoke_config('transition_matching', dataset, **kw)
  ds = data.build(config.data)
  return ds, load_method(config, spec or ds.spec)


def _random_params(method, seed=0, scale=0.3):
  """Init params plus noise (zero-init output layers make the head const)."""
  params = method.init(jax.random.key(seed), None).params
  leaves, tdef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tdef, [
      a + scale * jax.random.normal(k, a.shape)
      for a, k in zip(leaves, keys, strict=True)])


_STUB_PARAMS = {'backbone': None, 'head': None}


def _stub_net(fn):
  """Backbone stand-in: `fn(p, x, t, h, y)` is its output and its features
  (`net.bind(p).features`), so stubs serve either `head_input`."""
  return types.SimpleNamespace(
      apply=fn, bind=lambda p: types.SimpleNamespace(
          features=lambda x, t, h, y: fn(p, x, t, h, y)))


# ------------------------------------------------------------ closed forms
def _mv(a, v):
  return jnp.einsum('...ij,...j->...i', a, v)


def _posterior(mu, sigma, tau):
  """(G, offset, C): p(Y | X_τ = z) = N(G z + offset, C); τ [] or [B]."""
  tau = jnp.asarray(tau, jnp.float32)[..., None, None]
  eye = jnp.eye(mu.shape[0])
  czz = (1 - tau)**2 * eye + tau**2 * sigma
  cyz = tau * sigma - (1 - tau) * eye
  gain = cyz @ jnp.linalg.inv(czz)
  return gain, mu - tau[..., 0] * _mv(gain, mu), sigma + eye - gain @ cyz


def _gaussian_head(m, c, y, s):
  """Exact FM velocity from N(0, I) to N(m, C); m, y [..., d], s scalar."""
  eye = jnp.eye(m.shape[-1])
  a = (s * c - (1 - s) * eye) @ jnp.linalg.inv((1 - s)**2 * eye + s**2 * c)
  return m + _mv(a, y - s * m)


def _exact_stubs(method, mu, sigma):
  """Backbone = identity (h = X_τ), head = the exact kernel (one τ for the
  whole batch, as the sampler's)."""
  d = mu.shape[0]
  method.net = _stub_net(lambda p, x, t, h, y: x)

  def velocity(p, ctx, y, s):
    z, t = ctx
    gain, off, c = _posterior(mu, sigma, 1.0 - t[0])
    m = _mv(gain, z[:, 0]) + off
    return _gaussian_head(m, c, y[:, 0], jnp.reshape(s, ()))[:, None]

  method.head = types.SimpleNamespace(
      context=lambda p, rep, t: (rep[..., :d], t), velocity=velocity)


def _fm_velocity(mu, sigma):
  """Flow matching's v(z, t) = E[e - x | z_t] (harness time t = 1 - τ)."""
  def v(z, t):
    gain, off, _ = _posterior(mu, sigma, 1.0 - t)
    return -(_mv(gain, z) + off)
  return v


def _gauss(ds):
  return (jnp.asarray(ds.spec.mean, jnp.float32),
          jnp.asarray(ds.spec.cov, jnp.float32))


# ------------------------------------- 1. the supervising process and p(Y|X)
def test_supervising_pair_is_the_flow_matching_pair():
  """X_τ = FM's z_t at t = 1 - τ and Y = -(FM's target e - x)."""
  _, method = _setup()
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x, e = jax.random.normal(k1, (2, 64, 2))
  t = jax.random.uniform(k3, (64,))
  xt, y = method.supervising_pair(x, e, 1.0 - t)
  np.testing.assert_allclose(xt, (1 - t[:, None]) * x + t[:, None] * e,
                             atol=1e-6)
  np.testing.assert_array_equal(y, -(e - x))
  # X_{τ+Δ} = X_τ + Δ Y along the path (the DTM update).
  xt2, _ = method.supervising_pair(x, e, 1.0 - t + 0.125)
  np.testing.assert_allclose(xt2, xt + 0.125 * y, atol=1e-5)
  del k2


@pytest.mark.parametrize('tau', [0.0, 0.3, 0.8])
def test_target_distribution_closed_form(tau):
  """The method's (X_τ, Y) pairs have p(Y | X_τ) = the Gaussian closed form,
  whose mean is -v_FM (eq. 14): regression of Y on X_τ recovers G, offset
  and the residual covariance C."""
  ds, method = _setup()
  mu, sigma = _gauss(ds)
  n = 400_000
  x1 = ds.sample(jax.random.key(1), n)['x']
  x0 = jax.random.normal(jax.random.key(2), x1.shape)
  xt, y = method.supervising_pair(x1, x0, jnp.full((n,), tau))
  xt, y = np.asarray(xt, np.float64), np.asarray(y, np.float64)
  design = np.concatenate([xt, np.ones((n, 1))], 1)
  coef, *_ = np.linalg.lstsq(design, y, rcond=None)
  resid = y - design @ coef
  gain, off, c = (np.asarray(a) for a in _posterior(mu, sigma, tau))
  np.testing.assert_allclose(coef[:2].T, gain, atol=0.01)
  np.testing.assert_allclose(coef[2], off, atol=0.01)
  np.testing.assert_allclose(np.cov(resid.T), c, atol=0.02)
  # FM velocity in eigen form (docs/methods/meanflow.md §3): -v = m.
  lam, q = np.linalg.eigh(ds.spec.cov)
  t = 1 - tau
  g_fm = q @ np.diag((t - (1 - t) * lam) / ((1 - t)**2 * lam + t**2)) @ q.T
  np.testing.assert_allclose(-g_fm, gain, atol=1e-5)
  if tau > 0:  # the kernel is a genuine distribution: FM-Euler drops C
    assert np.linalg.eigvalsh(c).min() > 0.01


def test_head_loss_is_flow_matching_loss_plus_noise_variance():
  """A head that ignores (Y_s, s) and outputs -v(X_τ, t) has DTM loss =
  FM loss of v + E‖Y_0‖²/d = FM + 1 (the cross term has mean 0): the
  s-independent part of the head regresses exactly FM's target, and the
  rest of the loss is the kernel's noise."""
  ds, method = _setup()
  fm = load_method(smoke_config('flow_matching', 'toy2d:gaussian'), ds.spec)
  v_exact = _fm_velocity(*_gauss(ds))
  batch = ds.sample(jax.random.key(3), 200_000)
  losses = []
  for shift in (0.0, 0.5):
    v = lambda z, t, shift=shift: v_exact(z, t) + shift
    fm.net = types.SimpleNamespace(apply=lambda p, x, t, h, y, v=v: v(x, t))
    method.net = _stub_net(lambda p, x, t, h, y: x)
    method.head = types.SimpleNamespace(
        context=lambda p, rep, t: (rep[..., :2], t),
        velocity=lambda p, ctx, y, s, v=v: -v(ctx[0][:, 0], ctx[1])[:, None])
    fm_loss, _ = fm.loss(None, batch, jax.random.key(4), None)
    tm_loss, _ = method.loss(_STUB_PARAMS, batch, jax.random.key(5), None)
    assert float(tm_loss) == pytest.approx(float(fm_loss) + 1.0, abs=0.02)
    losses.append(float(fm_loss))
  # A velocity off by 0.5 costs 0.25 per dim, in both losses alike.
  assert losses[1] - losses[0] == pytest.approx(0.25, abs=0.02)


# ------------------------------------------------- 2. exact-kernel sampling
@pytest.mark.parametrize('nfe', [1, pytest.param(3, marks=pytest.mark.slow)])
def test_exact_kernel_samples_data_at_any_T(nfe):
  """Spec §2.9.1: with the exact kernel the method's own sampler reproduces
  N(μ, Σ) at every T (FM-Euler collapses to μ at T = 1)."""
  ds, method = _setup(**{'method.head_steps': 16})  # midpoint: 0.1 % bias
  mu, sigma = _gauss(ds)
  _exact_stubs(method, mu, sigma)
  x = np.asarray(jax.jit(lambda k: method.sample(_STUB_PARAMS, k, 40_000,
                                                 nfe=nfe))(jax.random.key(6)))
  np.testing.assert_allclose(x.mean(0), mu, atol=0.03)
  np.testing.assert_allclose(np.cov(x.T), sigma, atol=0.06)


@pytest.mark.parametrize('nfe,head_steps,sampler', [
    (1, 1, 'euler'), (2, 3, 'euler'), (4, 2, 'euler'), (1, 1, 'midpoint'),
    (2, 3, 'midpoint')])
def test_mean_head_gives_flow_matching_euler(nfe, head_steps, sampler):
  """Eq. 14 / Thm. 1: a head that samples the point mass E[Y | X_τ] = -v
  (u = (m - y)/(1 - s), exact under Euler and midpoint, whose stages stop
  short of s = 1) makes DTM's step FM's Euler step: flow_matching's own
  sampler from the same X_0 gives the same x."""
  ds, method = _setup(**{'method.head_steps': head_steps,
                         'method.head_sampler': sampler})
  v = _fm_velocity(*_gauss(ds))
  method.net = _stub_net(lambda p, x, t, h, y: x)
  method.head = types.SimpleNamespace(
      context=lambda p, rep, t: -v(rep[:, 0, :2], t)[:, None],
      velocity=lambda p, m, y, s: (m - y) / (1 - s))
  fm = load_method(smoke_config('flow_matching', 'toy2d:gaussian'), ds.spec)
  fm.net = types.SimpleNamespace(apply=lambda p, x, t, h, y: v(x, t))
  key = jax.random.key(7)
  x_tm = method.sample(_STUB_PARAMS, key, 256, nfe=nfe)
  x_fm = fm.sample(None, jax.random.split(key)[0], 256, nfe=nfe)
  np.testing.assert_allclose(x_tm, x_fm, atol=2e-5)


def _corr_two_tokens(nfe, rho=0.95, n=20_000):
  """Spec §2.9.4: two 1-D tokens, corr(x¹, x²) = ρ, exact *per-token* heads.

  The backbone stub sees all of X_τ and writes each token's exact marginal
  p(Y^i | X_τ) = N(m_i, C_ii) into its representation; the head only sees
  its own token, so the tokens' Y^i are sampled independently.
  """
  spec = DataSpec(name='two_tokens', shape=(1, 2, 1), kind='image')
  # An MLP's features are one vector: the stub stands in for an 'output'
  # backbone. Midpoint x 4 head steps: variance within 1.3 % (test below).
  _, method = _setup(spec=spec, **{'method.head_input': 'output'})
  mu, sigma = jnp.zeros(2), jnp.array([[1.0, rho], [rho, 1.0]])

  def backbone(p, x, t, h, y):
    gain, off, c = _posterior(mu, sigma, 1.0 - t)
    m = _mv(gain, x[:, 0, :, 0]) + off
    sd = jnp.sqrt(jnp.diagonal(c, axis1=-2, axis2=-1))
    return jnp.stack([m, sd], -1)[:, None]  # [B, 1, 2, 2]: (m_i, sd_i)

  def velocity(p, rep, y, s):
    m, var = rep[..., :1], jnp.square(rep[..., 1:])
    s = jnp.reshape(s, ())
    return m + (s * var - (1 - s)) / ((1 - s)**2 + s**2 * var) * (y - s * m)

  method.net = _stub_net(backbone)
  method.head = types.SimpleNamespace(context=lambda p, rep, t: rep,
                                      velocity=velocity)
  x = jax.jit(lambda k: method.sample(_STUB_PARAMS, k, n, nfe=nfe))(
      jax.random.key(8))
  x = np.asarray(x).reshape(n, 2)
  if nfe == 1:  # exact marginals; later steps see a decorrelated X_τ
    np.testing.assert_allclose(x.std(0), 1.0, atol=0.03)
  return np.corrcoef(x.T)[0, 1]


def test_independent_token_heads_lose_correlation_at_small_T():
  """Per-token heads cannot make cross-token correlation at T = 1 (no
  hidden leakage), and recover it as T grows (spec §2.9.4, P A.5)."""
  corr = [_corr_two_tokens(nfe) for nfe in (1, 2, 16)]
  assert abs(corr[0]) < 0.03
  assert all(a < b for a, b in zip(corr, corr[1:], strict=False))
  assert corr[-1] > 0.85


# ------------------------------------------------ 3. NFE and FLOP accounting
@pytest.mark.parametrize('nfe,sampler', [(1, 'euler'), (3, 'euler'),
                                         (2, 'midpoint'), (1, 'heun')])
def test_backbone_called_exactly_T_times(nfe, sampler):
  """T backbone passes, T head contexts, T·N·(evals per step) head
  evaluations, at τ_k = k/T and the scheme's head times (call log of
  stand-ins; the FLOP test below counts the real networks)."""
  _, method = _setup(**{'method.head_steps': 5,
                        'method.head_sampler': sampler})
  calls = {'net': [], 'context': 0, 'velocity': []}

  def net(p, x, t, h, y):
    calls['net'].append(float(t[0]))
    return x

  def context(p, rep, t):
    calls['context'] += 1
    return rep[..., :2]

  def velocity(p, ctx, y, s):
    calls['velocity'].append(float(jnp.reshape(s, ())))
    return ctx - y

  method.net = _stub_net(net)
  method.head = types.SimpleNamespace(context=context, velocity=velocity)
  with jax.disable_jit():
    x = method.sample(_STUB_PARAMS, jax.random.key(1), 16, nfe=nfe)
  assert x.shape == (16, 2) and np.all(np.isfinite(x))
  assert calls['context'] == nfe
  # Backbone time is the harness's t = 1 - τ_k; head times s_j = j / N
  # (+ 1/2N for the midpoint stage, + 1/N for Heun's corrector).
  np.testing.assert_allclose(calls['net'], 1 - np.arange(nfe) / nfe,
                             atol=1e-7)
  s = np.arange(5) / 5
  stages = {'euler': [s], 'midpoint': [s, s + 0.1], 'heun': [s, s + 0.2]}
  s = np.stack(stages[sampler], -1).reshape(-1)
  assert len(calls['velocity']) == tm.HEAD_SAMPLERS[sampler] * 5 * nfe
  np.testing.assert_allclose(calls['velocity'], np.tile(s, nfe), atol=1e-6)


@pytest.mark.parametrize('dataset,nfe,head_input', [
    ('toy2d:gaussian', 3, 'hidden'), ('toy2d:gaussian', 2, 'output'),
    pytest.param('digits', 2, 'hidden', marks=pytest.mark.slow),
    pytest.param('digits', 2, 'output', marks=pytest.mark.slow)])
def test_sampling_flops_are_backbone_plus_every_head_step(dataset, nfe,
                                                          head_input):
  """The evaluator's effective NFE = T (1 + (c_ctx + E c_head) / c_backbone):
  the jaxpr FLOPs of `sample` are exactly T backbone passes + T contexts +
  T·E head evaluations (E = head_steps x 2 for the midpoint default); the
  denominator is the protocol's reference backbone (data channels in and
  out): TM's rep_dim backbone ('output') costs more, its features pass
  ('hidden', no output layer) less, and either is what is counted. Pieces
  counted on the same batch (the s-embedding runs once per batch)."""
  kw = dict(tm.IMAGE_PRESET) if dataset == 'digits' else {}
  kw['head_input'] = head_input
  _, method = _setup(dataset, **{f'method.{k}': v for k, v in kw.items()})
  params = jax.eval_shape(lambda: method.init(jax.random.key(0), None).params)
  n = 8
  big_n = method.mcfg.head_steps * tm.HEAD_SAMPLERS[method.mcfg.head_sampler]
  assert big_n == (8 if method.mcfg.head_sampler == 'midpoint' else 4)
  x = jnp.zeros((n, *method.spec.shape))
  t = jnp.full((n,), 0.5)
  fwd = count_flops(lambda p: method.representation(p, x, t, None),
                    params)[0]
  rep = jax.eval_shape(lambda p: method.representation(p, x, t, None), params)
  ctx_f = count_flops(lambda p, r: method.head.context(p['head'], r, t),
                      params, rep)[0]
  ctx = jax.eval_shape(lambda p, r: method.head.context(p['head'], r, t),
                       params, rep)
  ytok = method.to_tokens(x)
  vel_f = count_flops(lambda p, c: method.head.velocity(
      p['head'], c, ytok, jnp.zeros((1, 1))), params, ctx)[0]
  total, exact = count_flops(lambda p, k: method.sample(p, k, n, nfe=nfe),
                             params, jax.random.key(1))
  assert exact and total == nfe * (fwd + ctx_f + big_n * vel_f)
  # The evaluator's numbers.
  one = runner.reference_forward(method.config.model, method.spec).flops
  if head_input == 'output':  # rep_dim in/out channels cost more
    assert one < fwd / n
  else:  # the same backbone without its output layer
    assert fwd / n < one
  if dataset == 'digits':  # compiling the U-Net sampler is slow on CPU
    return
  params = method.init(jax.random.key(0), None).params
  _, cost = runner.draw_samples(method, params, jax.random.key(2), n, nfe, n)
  eff = cost['flops_per_sample'] / one
  assert eff == pytest.approx(nfe * (fwd + ctx_f + big_n * vel_f) / n / one)
  assert eff > nfe * (1 + 0.01 * big_n)  # the head is not free


# ----------------------------------------------------------- 4. the head
def test_tokens_round_trip_and_head_has_no_cross_token_leakage():
  spec = DataSpec(name='img', shape=(4, 6, 2), kind='image')
  _, method = _setup(spec=spec, **{'method.head_patch': 2,
                                   'method.rep_dim': 3,
                                   'method.head_input': 'output'})
  a = jax.random.normal(jax.random.key(0), (3, 4, 6, 2))
  tok = method.to_tokens(a)
  assert tok.shape == (3, 6, 8)
  np.testing.assert_array_equal(method.from_tokens(tok), a)
  # Token 4 = patch row 1, col 1: pixels [2:4, 2:4].
  np.testing.assert_array_equal(tok[:, 4].reshape(3, 2, 2, 2),
                                a[:, 2:4, 2:4])
  head = method.head.init(jax.random.key(0))
  leaves, tdef = jax.tree.flatten(head)
  params = jax.tree.unflatten(tdef, [  # zero-init layers made non-trivial
      a + 0.3 * jax.random.normal(jax.random.key(i), a.shape)
      for i, a in enumerate(leaves)])
  rep = jax.random.normal(jax.random.key(1), (1, 6, 12))
  y = jax.random.normal(jax.random.key(2), (1, 6, 8))
  t, s = jnp.full((1,), 0.3), jnp.full((1, 6), 0.6)

  def u(rep, y):
    ctx = method.head.context(params, rep, t)
    return method.head.velocity(params, ctx, y, s)[0]

  base = u(rep, y)
  for j in (0, 4):  # perturb token j's Y_s or h: only row j may move
    for r2, y2 in ((rep.at[:, j].add(1.0), y), (rep, y.at[:, j].add(1.0))):
      moved = jnp.max(jnp.abs(u(r2, y2) - base), -1)
      assert float(moved[j]) > 1e-3
      assert float(jnp.max(moved.at[j].set(0.0))) == 0.0, 'tokens mix'


@pytest.mark.slow  # compiles a train step (the contract test trains too)
def test_loss_trains_backbone_and_head():
  """Gradients reach the backbone's input layer and every head layer once
  the zero-init output layers have moved, and the loss goes down."""
  ds, method = _setup('toy2d:8gaussians', **{'method.head_batch_mul': 2})
  start = state = method.init(jax.random.key(0), None)
  step = jax.jit(method.train_step)
  losses = []
  for i in range(20):
    state, m = step(state, ds.sample(jax.random.key(i), 256),
                    jax.random.key(100 + i))
    losses.append(float(m['loss']))
  # Adam moves a parameter only where its gradient was non-zero.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       state.params, start.params)
  assert moved['backbone']['inp']['kernel'] > 0  # through the head's cond
  assert moved['head']['cond']['kernel'] > 0
  assert moved['head']['block0']['fc1']['kernel'] > 0
  assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_discrete_training_grid_and_supported_nfe():
  """train_T = 4: τ ∈ {0, 1/4, 1/2, 3/4}; sampling only at T | 4."""
  _, method = _setup(**{'method.train_T': 4})
  tau = method.sample_tau(jax.random.key(0), 4096)
  np.testing.assert_array_equal(np.unique(tau), [0, 0.25, 0.5, 0.75])
  assert tuple(method.supported_nfe) == (1, 2, 4)
  params = method.init(jax.random.key(0), None).params
  with pytest.raises(UnsupportedNFEError, match='supported'):
    method.sample(params, jax.random.key(0), 4, nfe=3)
  assert method.sample(params, jax.random.key(0), 4, nfe=2).shape == (4, 2)
  _, cont = _setup()
  t = cont.sample_tau(jax.random.key(0), 4096)
  assert len(np.unique(t)) > 4000 and 0 <= float(t.min()) < float(t.max()) < 1


def test_guidance_is_applied_to_the_head_velocity():
  """w ≠ 1: one batched [conditional; null] backbone pass per transition and
  u = u_∅ + w (u_y - u_∅); None / 1.0: the plain conditional pass."""
  spec = DataSpec(name='toy2d:labelled', shape=(2,), num_classes=3)
  _, method = _setup(spec=spec, **{'method.head_steps': 1})
  batches = []

  def backbone(p, x, t, h, y):
    batches.append(x.shape[0])
    return x + y[:, None].astype(jnp.float32)  # label-dependent h

  method.net = _stub_net(backbone)
  method.head = types.SimpleNamespace(
      context=lambda p, rep, t: rep[..., :2],
      velocity=lambda p, ctx, y, s: ctx + 0.0 * y)
  labels = jnp.array([0, 1, 2, 1])
  key = jax.random.key(3)
  k0, kh = jax.random.split(key)
  x0 = method.noise(k0, 4)
  y0 = jax.random.normal(jax.random.fold_in(kh, 0), (4, 1, 2))[:, 0]
  w = 3.0
  out = method.sample(_STUB_PARAMS, key, 4, nfe=1, labels=labels, guidance=w)
  u_c, u_u = x0 + labels[:, None], x0 + 3.0
  np.testing.assert_allclose(out, x0 + y0 + u_u + w * (u_c - u_u), atol=1e-5)
  assert batches == [8]
  for g in (None, 1.0):
    out = method.sample(_STUB_PARAMS, key, 4, nfe=1, labels=labels,
                        guidance=g)
    np.testing.assert_allclose(out, x0 + y0 + u_c, atol=1e-5)
  assert batches == [8, 4, 4]
  # Training drops labels to the null class at `class_dropout`.
  seen = []
  method.net = _stub_net(lambda p, x, t, h, y: seen.append(y) or x)
  method.head = types.SimpleNamespace(
      context=lambda p, rep, t: rep[..., :2],
      velocity=lambda p, ctx, y, s: ctx)
  method.loss(_STUB_PARAMS, {'x': jnp.zeros((4000, 2)),
                             'y': jnp.zeros((4000,), jnp.int32)},
              jax.random.key(4), None)
  assert float(jnp.mean(seen[0] == 3)) == pytest.approx(0.1, abs=0.02)


def test_config_errors():
  spec = DataSpec(name='img', shape=(6, 6, 3), kind='image')
  with pytest.raises(ValueError, match='rep_dim'):
    _setup(spec=spec, **{'method.rep_dim': 2, 'method.head_input': 'output'})
  with pytest.raises(ValueError, match='head_input'):  # mlp: one vector
    _setup(spec=spec)
  with pytest.raises(ValueError, match='head_patch'):
    _setup(spec=spec, **{'method.head_patch': 4})
  with pytest.raises(ValueError, match='head_patch'):
    _setup(**{'method.head_patch': 2})
