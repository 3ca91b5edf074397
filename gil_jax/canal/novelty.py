"""Novel-cell detection (CANAL §3): normalised energy + max-probability uncertainty.

u(x) = (minmax(E)(x) + 1 − max p(x)) / 2 with E = −T·logsumexp(z/T) over active classes.
CANAL's threshold τ = ½[mean(1 − minmax(E_mix)) + mean(max p_mix)] over `n_mix` manifold mixups
per cell (scalar λ ~ U(0,1), random partner from the same query set); u > τ ⇒ "Unassigned".
The rule is transductive (min-max over the query set). Alternative rule 'validation': energies
normalised with the min/max of held-out validation cells of known types, τ = their q-quantile
(q = config.canal.novelty_quantile). Rule 'validation_auto' picks q on validation cells only
(`select_quantile`: leave-one-class-out pseudo-novelty), never on test cells. Rule
'mahalanobis' scores a cell in feature space instead of by its logits: the smallest Mahalanobis
distance of its manifold vector m to a known class's mean (means and one pooled covariance from
the training cells of every stage, embedded by the final model), threshold
at the q-quantile of the validation cells' scores (q = config.canal.novelty_quantile). A type the
head has never seen is often assigned confidently to a neighbouring type, yet sits away from that
type's cells in m.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gil_jax.canal import head as head_lib

RULES = ("canal", "validation", "validation_auto", "mahalanobis")
QUANTILE_GRID = (0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99)


def energy(logits: jnp.ndarray, active: jnp.ndarray, temperature: float) -> jnp.ndarray:
  z = jnp.where(active, logits / temperature, -jnp.inf)
  return -temperature * jax.scipy.special.logsumexp(z, axis=-1)


def _minmax(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
  return (x - lo) / max(hi - lo, 1e-12)


def uncertainty(e_norm: np.ndarray, conf: np.ndarray) -> np.ndarray:
  return (e_norm + 1.0 - conf) / 2.0


@dataclasses.dataclass
class Novelty:
  score: np.ndarray        # float[N] uncertainty u(x)
  unassigned: np.ndarray   # bool[N]  u > threshold
  threshold: float


def _bucket(n: int) -> int:
  """Rows padded to a power of two (>= 64), so query sets of similar size share a compilation."""
  return max(64, 1 << max(0, int(n) - 1).bit_length())


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  x = np.asarray(x)
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)]) if n > len(x) else x


@functools.partial(jax.jit, static_argnames="temperature")
def _stats_jit(logits, active, temperature):
  e = energy(logits, active, temperature)
  return e, jnp.max(jax.nn.softmax(logits, -1), -1)


def _stats(logits, active, temperature):
  """(energy, max probability) per cell, host numpy (one jitted call, not op-by-op)."""
  logits = np.asarray(logits, np.float32)
  n = len(logits)
  e, conf = _stats_jit(jnp.asarray(_pad_rows(logits.reshape(n, -1), _bucket(n))),
                       jnp.asarray(active), temperature=float(temperature))
  shape = logits.shape[:-1]
  return np.asarray(e)[:n].reshape(shape), np.asarray(conf)[:n].reshape(shape)


@functools.partial(jax.jit, static_argnames=("temperature", "n_mix"))
def _mixup_jit(head, m, n_valid, active, key, temperature, n_mix):
  kp, kl = jax.random.split(key)
  partner = jax.random.randint(kp, (m.shape[0],), 0, n_valid)  # partners among real cells only
  lam = jax.random.uniform(kl, (m.shape[0], n_mix, 1))
  mixed = lam * m[:, None, :] + (1.0 - lam) * m[partner][:, None, :]
  _, z = head_lib.from_manifold(head, mixed)
  return _stats_jit(head_lib.mask_logits(z, active), active, temperature)


def mixup_stats(head: dict, m: np.ndarray, active: np.ndarray, temperature: float, n_mix: int,
                key) -> tuple[np.ndarray, np.ndarray]:
  """Energies and confidences of n_mix manifold mixups per cell ([N, n_mix] each): scalar
  λ ~ U(0, 1) per mixup, one random partner per cell from the same query set."""
  m = np.asarray(m, np.float32)
  n = len(m)
  e, conf = _mixup_jit(jax.tree.map(jnp.asarray, head), jnp.asarray(_pad_rows(m, _bucket(n))),
                       jnp.int32(n), jnp.asarray(active), key, temperature=float(temperature),
                       n_mix=int(n_mix))
  return np.asarray(e)[:n], np.asarray(conf)[:n]


def canal_rule(logits: np.ndarray, m: np.ndarray, head: dict, active: np.ndarray, *,
               temperature: float = 0.8, n_mix: int = 128, key=None) -> Novelty:
  """CANAL's transductive score and mixup threshold on one query set."""
  key = jax.random.PRNGKey(0) if key is None else key
  e, conf = _stats(logits, active, temperature)
  u = uncertainty(_minmax(e, e.min(), e.max()), conf)
  e_mix, c_mix = mixup_stats(head, m, active, temperature, n_mix, key)
  tau = 0.5 * (float(np.mean(1.0 - _minmax(e_mix, e_mix.min(), e_mix.max())))
               + float(np.mean(c_mix)))
  return Novelty(score=u, unassigned=u > tau, threshold=tau)


def calibrate(val_logits: np.ndarray, active: np.ndarray, *, temperature: float = 0.8,
              quantile: float = 0.95) -> dict:
  """The validation rule's constants from validation cells of known types: energy min / max
  (for the normalisation) and τ = the `quantile` of their u. JSON-able (saved with the run)."""
  ev, cv = _stats(val_logits, active, temperature)
  lo, hi = float(ev.min()), float(ev.max())
  tau = float(np.quantile(uncertainty(_minmax(ev, lo, hi), cv), quantile))
  return {"energy_min": lo, "energy_max": hi, "threshold": tau, "quantile": float(quantile),
          "temperature": float(temperature)}


def calibrate_canal(val_logits: np.ndarray, val_m: np.ndarray, head: dict, active: np.ndarray, *,
                    temperature: float = 0.8, n_mix: int = 128, key=None) -> dict:
  """CANAL's constants computed once on validation cells instead of on each query set: their
  energy range (normalisation) and the mixup threshold τ of `canal_rule`. JSON-able."""
  key = jax.random.PRNGKey(0) if key is None else key
  ev, _ = _stats(val_logits, active, temperature)
  e_mix, c_mix = mixup_stats(head, val_m, active, temperature, n_mix, key)
  tau = 0.5 * (float(np.mean(1.0 - _minmax(e_mix, e_mix.min(), e_mix.max())))
               + float(np.mean(c_mix)))
  return {"energy_min": float(ev.min()), "energy_max": float(ev.max()), "threshold": tau,
          "quantile": None, "temperature": float(temperature)}


def mahalanobis_scores(m: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
  """float[N]: min over classes of (m − μ_k)ᵀ P (m − μ_k), as xᵀPx − 2 xᵀPμ + μᵀPμ ([N, K] at
  most in memory)."""
  m = np.asarray(m, np.float64)
  means, precision = np.asarray(means, np.float64), np.asarray(precision, np.float64)
  mp = m @ precision
  d = (np.sum(mp * m, 1)[:, None] - 2.0 * mp @ means.T
       + np.sum((means @ precision) * means, 1)[None, :])
  return np.maximum(d.min(1), 0.0)


def calibrate_mahalanobis(ref_m: np.ndarray, ref_labels: np.ndarray, val_m: np.ndarray,
                          active: np.ndarray, *, quantile: float = 0.95,
                          ridge: float = 1e-3) -> dict:
  """The 'mahalanobis' rule's constants: per known class the mean of the reference cells' m, the
  inverse of their pooled within-class covariance (plus `ridge` × its mean variance on the
  diagonal), and τ = the `quantile` of the validation cells' scores. JSON-able."""
  ref_m, ref_labels = np.asarray(ref_m, np.float64), np.asarray(ref_labels)
  classes = [int(c) for c in np.flatnonzero(np.asarray(active, bool)) if np.any(ref_labels == c)]
  if len(classes) < 2:
    raise ValueError(f"the mahalanobis novelty rule needs reference cells of >= 2 known types, "
                     f"found {len(classes)}; use novelty_rule='validation' or 'canal'.")
  keep = np.isin(ref_labels, classes)
  ref_m, ref_labels = ref_m[keep], ref_labels[keep]
  means = np.stack([ref_m[ref_labels == c].mean(0) for c in classes])
  centred = ref_m - means[np.searchsorted(classes, ref_labels)]
  cov = centred.T @ centred / max(1, len(centred) - len(classes))
  cov += ridge * max(float(np.trace(cov)) / len(cov), 1e-12) * np.eye(len(cov))
  precision = np.linalg.inv(cov)
  val_scores = mahalanobis_scores(val_m, means, precision)
  tau = float(np.quantile(val_scores, quantile))
  return {"rule": "mahalanobis", "classes": classes, "means": means.tolist(),
          "precision": precision.tolist(), "threshold": tau, "quantile": float(quantile),
          "n_reference_cells": int(len(ref_m))}


def apply_calibration(logits: np.ndarray, active: np.ndarray, calib: dict,
                      m: np.ndarray | None = None) -> Novelty:
  """Query cells scored with the saved constants, each cell on its own; score > τ ⇒
  Unassigned. The validation rules: u normalised with the validation energy range; rule
  'mahalanobis': the distance of the cells' manifold vectors `m` to the known class means."""
  if calib.get("rule") == "mahalanobis":
    if m is None:
      raise ValueError("the mahalanobis novelty rule needs the cells' manifold vectors m.")
    score = mahalanobis_scores(m, calib["means"], calib["precision"])
    return Novelty(score=score, unassigned=score > calib["threshold"],
                   threshold=calib["threshold"])
  e, conf = _stats(logits, active, calib["temperature"])
  u = uncertainty(_minmax(e, calib["energy_min"], calib["energy_max"]), conf)
  return Novelty(score=u, unassigned=u > calib["threshold"], threshold=calib["threshold"])


def validation_rule(logits: np.ndarray, val_logits: np.ndarray, active: np.ndarray, *,
                    temperature: float = 0.8, quantile: float = 0.95) -> Novelty:
  """Threshold at the `quantile` of u over validation cells of known types."""
  return apply_calibration(logits, active, calibrate(val_logits, active, temperature=temperature,
                                                     quantile=quantile))


def select_quantile(val_logits: np.ndarray, val_labels: np.ndarray, active: np.ndarray, *,
                    temperature: float = 0.8, grid=QUANTILE_GRID, min_cells: int = 5) -> dict:
  """Chooses the validation rule's quantile q on validation cells of known types only.

  Leave-one-class-out pseudo-novelty: for each active class c with >= `min_cells` validation
  cells, c's logit is masked out (the head cannot name c, as for a truly novel type), τ_q is the
  q-quantile of u over the other classes' validation cells (energies min-max normalised over
  them), and H(q) = harmonic mean of known accuracy (other classes: correct and not flagged) and
  unknown accuracy (c's cells flagged). Returns the q of the largest mean H over classes (ties:
  the larger q), with the per-q curve. Caveat: the backbone has seen c in training, so c's cells
  form a tighter cluster than an unseen type would; the choice is an estimate, not an oracle.
  """
  val_logits, val_labels = np.asarray(val_logits, np.float32), np.asarray(val_labels)
  active = np.asarray(active, bool)
  grid = sorted(float(q) for q in grid)
  classes = [int(c) for c in np.flatnonzero(active) if np.sum(val_labels == c) >= min_cells]
  if len(classes) < 3:
    raise ValueError(f"novelty quantile selection needs >= 3 classes with >= {min_cells} "
                     f"validation cells, found {len(classes)}; raise config.canal.val_fraction "
                     "or use novelty_rule='validation' with a fixed config.canal.novelty_quantile.")
  h = np.zeros((len(classes), len(grid)))
  for i, c in enumerate(classes):
    act = active.copy()
    act[c] = False
    z = np.where(act, val_logits, head_lib.MASKED_LOGIT)
    e, conf = _stats(z, act, temperature)
    pseudo = val_labels == c
    lo, hi = float(e[~pseudo].min()), float(e[~pseudo].max())
    u = uncertainty(_minmax(e, lo, hi), conf)
    correct = np.argmax(z, -1) == val_labels
    for j, q in enumerate(grid):
      flagged = u > float(np.quantile(u[~pseudo], q))
      h[i, j] = _h(float(np.mean(correct[~pseudo] & ~flagged[~pseudo])),
                   float(np.mean(flagged[pseudo])))
  mean_h = h.mean(0)
  best = int(np.flatnonzero(mean_h == mean_h.max())[-1])
  return {"quantile": grid[best], "grid": grid, "mean_h": [float(x) for x in mean_h],
          "pseudo_novel_classes": classes}


def _h(a: float, b: float) -> float:
  return 0.0 if a + b == 0 else 2 * a * b / (a + b)
