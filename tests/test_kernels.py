"""The training kernels (gil_jax/models/kernels.py) against plain reference math."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gil_jax import hostenv
from gil_jax.models import kernels

B, S, H, D = 4, 9, 4, 8


def reference(q, k, v, mask, keep=None):
  """Softmax attention with a boolean key mask; rows without a valid key give 0; optional
  scaled keep multiplier [B, H, Q, K] on the probabilities."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
  logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  p = jnp.nan_to_num(jax.nn.softmax(logits, axis=-1))
  if keep is not None:
    p = p * keep
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def reference_keep(seed, rate, nq, nk):
  """The kernels' dropout multiplier, built from keep_mask with global (cell, head) plane ids."""
  planes = jnp.arange(B * H, dtype=jnp.uint32).reshape(B, H, 1, 1)
  keep = kernels.keep_mask(seed, (nq, nk), rate, planes)
  return jnp.where(keep, 1.0 / (1.0 - rate), 0.0)


TILINGS = {  # name: (TILE_ELEMENTS, force a single kernel tile as off CPU)
    "1-head-tiles": (1, False), "2-head-tiles": (S * S * 2, False),
    "2-cell-tiles": (2 * H * S * S, False), "one-kernel-tile": (1, True), "plain": (1 << 30, False)}


@pytest.fixture(params=list(TILINGS))
def tile_elements(request, monkeypatch):
  elements, single_tile = TILINGS[request.param]
  monkeypatch.setattr(kernels, "TILE_ELEMENTS", elements)
  if single_tile:  # the GPU/TPU layout: the whole batch in one tile of the custom-vjp kernel
    monkeypatch.setattr(kernels, "_tiling", lambda b, h, q, k: kernels._Tiling(b, h, 1))
  return elements


def inputs():
  qkv = jax.random.normal(jax.random.key(0), (B, S, 3, H, D))
  mask = jnp.asarray(np.random.default_rng(0).random((B, S)) < 0.7).at[2].set(False)
  weights = jax.random.normal(jax.random.key(1), (B, S, H, D))
  return qkv, mask, weights


def assert_matches(ours, ref, args, w):
  """Same outputs, and same gradients of sum(out * w) w.r.t. every argument."""
  np.testing.assert_allclose(ours(*args), ref(*args), atol=1e-5)
  argnums = tuple(range(len(args)))
  g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=argnums)(*args)
  g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=argnums)(*args)
  for x, y in zip(g_ours, g_ref):
    np.testing.assert_allclose(x, y, atol=1e-5)


def cross_inputs():
  """q [B, 5, H, D] over the kv of ``inputs()`` (a non-square [Q, K]), and output weights."""
  qkv, mask, _ = inputs()
  q = jax.random.normal(jax.random.key(2), (B, 5, H, D))
  return q, qkv[:, :, 1:], mask, jax.random.normal(jax.random.key(3), (B, 5, H, D))


def test_self_attention_matches_reference(tile_elements):
  qkv, mask, w = inputs()
  ours = lambda x: kernels.self_attention(x, mask)
  assert_matches(ours, lambda x: reference(x[:, :, 0], x[:, :, 1], x[:, :, 2], mask), (qkv,), w)
  assert not np.any(ours(qkv)[2])  # a cell without valid keys gives exactly 0


def test_cross_attention_matches_reference(tile_elements):
  q, kv, mask, w = cross_inputs()
  assert_matches(lambda q, kv: kernels.cross_attention(q, kv, mask),
                 lambda q, kv: reference(q, kv[:, :, 0], kv[:, :, 1], mask), (q, kv), w)


def test_attention_dropout_is_the_documented_mask_in_both_passes(tile_elements):
  qkv, mask, w = inputs()
  seed, rate = kernels.seed_words(jax.random.key(7)), 0.3
  keep = reference_keep(seed, rate, S, S)
  assert_matches(lambda x: kernels.self_attention(x, mask, rate, seed),
                 lambda x: reference(x[:, :, 0], x[:, :, 1], x[:, :, 2], mask, keep), (qkv,), w)
  # no dropout without a seed, whatever the rate
  np.testing.assert_allclose(kernels.self_attention(qkv, mask, rate), reference(
      qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask), atol=1e-5)


def test_cross_attention_dropout_is_the_documented_mask(tile_elements):
  q, kv, mask, w = cross_inputs()
  seed, rate = kernels.seed_words(jax.random.key(8)), 0.4
  keep = reference_keep(seed, rate, 5, S)   # non-square [Q, K]: catches a transposed mask
  assert_matches(lambda q, kv: kernels.cross_attention(q, kv, mask, rate, seed),
                 lambda q, kv: reference(q, kv[:, :, 0], kv[:, :, 1], mask, keep), (q, kv), w)


def test_bfloat16_tiled_matches_plain(monkeypatch):
  qkv, mask, w = inputs()
  qkv, seed = qkv.astype(jnp.bfloat16), kernels.seed_words(jax.random.key(7))
  loss = lambda x: jnp.sum(kernels.self_attention(x, mask, 0.2, seed).astype(jnp.float32) * w)
  monkeypatch.setattr(kernels, "TILE_ELEMENTS", 1 << 30)
  out_plain, g_plain = jax.value_and_grad(loss)(qkv)
  monkeypatch.setattr(kernels, "TILE_ELEMENTS", 1)
  out_tiled, g_tiled = jax.value_and_grad(loss)(qkv)
  assert g_tiled.dtype == jnp.bfloat16
  np.testing.assert_allclose(out_tiled, out_plain, rtol=2e-2)
  np.testing.assert_allclose(np.asarray(g_tiled, np.float32), np.asarray(g_plain, np.float32),
                             atol=3e-2)


def test_keep_mask_rate_and_independence():
  seed = kernels.seed_words(jax.random.key(3))
  keep = kernels.keep_mask(seed, (512, 512), 0.15, jnp.arange(4, dtype=jnp.uint32)[:, None, None])
  assert keep.shape == (4, 512, 512)
  assert abs(1.0 - float(keep.mean()) - 0.15) < 0.002
  assert float(jnp.mean(keep[0] == keep[1])) < 0.8  # planes are not copies of each other
  other = kernels.keep_mask(kernels.seed_words(jax.random.key(4)), (512, 512), 0.15)
  assert float(jnp.mean(other == keep[0])) < 0.8   # a new key gives a new mask
  x = jnp.ones((1000, 100))
  y = kernels.dropout(x, 0.25, seed)
  np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1.0 / 0.75], rtol=1e-6)


@pytest.mark.parametrize("out", [6, 1])  # 1: the single-output (GEMV) backward
def test_dense_dot_general_matches_lax(out):
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  w = jax.random.normal(jax.random.key(1), (3, 4, out))
  dims = (((2, 3), (0, 1)), ((), ()))
  ours = lambda x, w: kernels.dense_dot_general(x, w, dims)
  ref = lambda x, w: jax.lax.dot_general(x, w, dims)
  np.testing.assert_allclose(ours(x, w), ref(x, w), atol=1e-5)
  for a, b in zip(jax.grad(lambda *a: jnp.sum(ours(*a) ** 2), argnums=(0, 1))(x, w),
                  jax.grad(lambda *a: jnp.sum(ref(*a) ** 2), argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_huge_pages_reexec():
  code = ("from gil_jax import hostenv; hostenv.use_huge_pages(); import os; "
          "print(os.environ.get('GLIBC_TUNABLES', ''))")
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT, hostenv.REEXECED)}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.strip()
  assert (hostenv.TUNABLE in out.split(":")) == hostenv._huge_pages_possible()
  env[hostenv.OPT_OUT] = "0"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.strip()
  assert out == ""
