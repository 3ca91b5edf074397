"""Benchmark one backbone's full train step: forward, backward, optimizer update, transforms.

  python benchmarks/bench_train_step.py --model transformer --paper --json
  python benchmarks/bench_train_step.py --model exceiver --seq-len 2048 --batch 32 --json

The batch is what training sees: every one of the `--seq-len` genes real (no padding), 40%
hidden, dropout on (the model config's rate), the full optimizer update over a `--capacity`-row
gene table. Prints JSON: cells_per_s, step_s (best of --reps), compile_s, model_flops_per_step
(analytic matmul FLOPs, forward x 3), achieved FLOP/s, fraction of the matmul peak this script
measures on this machine, peak memory, and the page faults of one step (with and without huge
pages: `GIL_JAX_HUGE_PAGES=0` opts out, see gil_jax/hostenv.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (best_time, device_peak_bytes, emit, matmul_peak, minor_faults,  # noqa: E402
                    peak_rss_bytes)  # first import: it may re-exec (gil_jax/hostenv.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gil_jax import hostenv, parallel  # noqa: E402
from gil_jax.batch import Batch  # noqa: E402
from gil_jax.config_base import base_config  # noqa: E402
from gil_jax.experiment import as_names  # noqa: E402
from gil_jax.losses import objectives, registry  # noqa: E402
from gil_jax.models import build_model, paper_transformer_config  # noqa: E402
from gil_jax.core.state import init_state, make_optimizer  # noqa: E402
from gil_jax.core.step import make_train_step  # noqa: E402


def model_flops_forward(mc, b: int, n: int) -> float:
  """Analytic matmul FLOPs of one forward pass (2 per multiply-add; gathers and norms ignored)."""
  d = mc.d_model
  if mc.name == "transformer":
    s, f = n + 1, mc.ffn_dim
    layer = s * (8 * d * d + 4 * d * f) + 4 * s * s * d       # qkv+out, ffn, QK^T and PV
    value_enc = _value_encoding_flops(mc, n)
    value_head = n * (4 * d * d + 2 * d)
    mvc = n * (6 * d * d + 2 * d) if mc.use_mvc else 0
    return float(b * (mc.n_layers * layer + value_enc + value_head + mvc))
  if mc.name == "exceiver":
    L, m = mc.n_latents, mc.ffn_mult
    enc = L * 2 * d * d + n * 4 * d * d + 4 * L * n * d + L * 2 * d * d + L * 4 * m * d * d
    proc = L * 8 * d * d + 4 * L * L * d + L * 4 * m * d * d
    dec = n * 2 * d * d + L * 4 * d * d + 4 * n * L * d + n * 2 * d * d + n * 4 * m * d * d
    head = n * (2 * d * d + 2 * d)
    value_enc = _value_encoding_flops(mc, n)
    return float(b * (enc + mc.n_layers * proc + dec + head + value_enc))
  raise ValueError(mc.name)


def _value_encoding_flops(mc, n: int) -> int:
  """The value encoder's MLP (+ bin mixing) per cell; the depth token's MLP is negligible."""
  d = mc.d_model
  out = {"additive": d, "film": 2 * d, "softbin": mc.n_bins, "scale": 0}[mc.value_encoding]
  mix = 2 * mc.n_bins * d if mc.value_encoding == "softbin" else 0
  return 0 if not out else n * (2 * d + 2 * d * out + mix)


def make_batch(b: int, n: int, capacity: int, seed: int = 0) -> Batch:
  """All n tokens real and distinct per cell, 40% hidden, values ~ log1p counts."""
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.choice(np.arange(1, capacity), n, replace=False) for _ in range(b)])
  targets = np.log1p(rng.poisson(2.0, (b, n))).astype(np.float32)
  pred = rng.random((b, n)) < 0.4
  return Batch(gene_ids=ids.astype(np.int32), values=np.where(pred, 0, targets).astype(np.float32),
               targets=targets, counts=np.expm1(targets).round().astype(np.float32),
               size_factors=np.ones(b, np.float32), token_mask=np.ones((b, n), bool),
               pred_mask=pred, cell_mask=np.ones(b, bool), labels=np.zeros(b, np.int32))


def build_config(args):
  c = base_config(args.model)
  if args.paper:
    if args.model != "transformer":
      raise SystemExit("--paper applies to --model transformer")
    c.model = paper_transformer_config()
  for field in ("d_model", "n_layers", "n_heads", "n_latents", "ffn_dim", "dropout"):
    v = getattr(args, field, None)
    if v is not None and field in c.model:
      c.model[field] = v
  c.model.dtype = args.dtype
  c.genes.capacity = args.capacity
  c.batch.batch_size, c.batch.n_tokens = args.batch, args.seq_len
  c.train.likelihood = args.likelihood
  c.loss_transforms = tuple(as_names(args.transforms))
  c.mesh.data, c.mesh.model = args.mesh_data, args.mesh_model
  return c


def run(args) -> dict:
  c = build_config(args)
  mesh = parallel.make_mesh(c.mesh)
  model = build_model(c.model, c.genes.capacity, c.train.likelihood)
  tx = make_optimizer(c.train)
  transform = registry.build(c)
  loss_fn = transform.wrap(objectives.make_task_loss(model, c.train.likelihood))
  batch = make_batch(args.batch, args.seq_len, c.genes.capacity)
  params = jax.jit(lambda k: model.init({"params": k, "dropout": k}, batch.gene_ids[:1],
                                        batch.values[:1], batch.token_mask[:1],
                                        batch.pred_mask[:1], False)["params"])(jax.random.key(0))
  state = init_state(params, tx, transform.init(params), jax.random.PRNGKey(1), c.genes.capacity)
  state = state.replace(active_genes=jnp.ones((c.genes.capacity,), bool).at[0].set(False))
  shardings = parallel.state_shardings(mesh, state, c.genes.capacity)
  inputs = {"main": batch}
  extra = transform.extra_inputs(state.transforms, None) if transform.extra_inputs else {}
  if extra:
    raise SystemExit("transforms with extra inputs (replay) are not benchmarked here")
  in_sh = parallel.batch_shardings(mesh, inputs)
  step = jax.jit(make_train_step(loss_fn, tx), in_shardings=(shardings, in_sh),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  state = jax.device_put(state, shardings)
  inputs = jax.device_put(inputs, in_sh)

  t = time.perf_counter()
  compiled = step.lower(state, inputs).compile()
  compile_s = time.perf_counter() - t
  box = [state]

  def one():
    box[0], m = compiled(box[0], inputs)
    jax.block_until_ready(m["loss"])

  step_s = best_time(one, args.reps, warmup=1, min_time=args.min_time)
  faults = minor_faults()
  one()
  faults = minor_faults() - faults
  flops = 3.0 * model_flops_forward(c.model, args.batch, args.seq_len)
  peak = max(matmul_peak(n, jnp.float32 if args.dtype == "float32" else jnp.bfloat16,
                         reps=args.reps) for n in (1024, 2048)) if args.peak else None
  out = {
      "model": c.model.name, "dtype": args.dtype, "d_model": c.model.d_model,
      "layers": c.model.n_layers, "heads": c.model.n_heads, "seq_len": args.seq_len,
      "batch": args.batch, "capacity": c.genes.capacity, "dropout": float(c.model.dropout),
      "devices": int(mesh.size), "mesh": dict(mesh.shape), "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "cells_per_s": round(args.batch / step_s, 2), "step_s": round(step_s, 5),
      "compile_s": round(compile_s, 3), "model_flops_per_step": flops,
      "achieved_flops_per_s": round(flops / step_s, 1),
      "matmul_peak_flops_per_s": round(peak, 1) if peak else None,
      "fraction_of_peak": round(flops / step_s / peak, 4) if peak else None,
      "peak_host_rss_bytes": peak_rss_bytes(), "peak_device_bytes": device_peak_bytes(),
      "page_faults_per_step": faults, "huge_pages": hostenv.huge_pages_active(),
      "loss": float(jax.device_get(compiled(box[0], inputs)[1]["loss"])),
  }
  return out


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", choices=("exceiver", "transformer"), default="transformer")
  p.add_argument("--paper", action="store_true", help="paper transformer (d=256, 6x8, FFN 256)")
  p.add_argument("--d-model", dest="d_model", type=int)
  p.add_argument("--layers", dest="n_layers", type=int)
  p.add_argument("--heads", dest="n_heads", type=int)
  p.add_argument("--latents", dest="n_latents", type=int)
  p.add_argument("--ffn", dest="ffn_dim", type=int)
  p.add_argument("--dropout", type=float)
  p.add_argument("--seq-len", dest="seq_len", type=int, default=512)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--capacity", type=int, default=60_000, help="gene-table rows (scGPT: ~60k)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--likelihood", choices=("mse", "poisson", "nb"), default="mse")
  p.add_argument("--transforms", default="", help="comma-separated loss transforms")
  p.add_argument("--mesh-data", dest="mesh_data", type=int, default=-1)
  p.add_argument("--mesh-model", dest="mesh_model", type=int, default=1)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--min-time", dest="min_time", type=float, default=0.0,
                 help="keep timing steps until this many seconds (best step is kept)")
  p.add_argument("--no-peak", dest="peak", action="store_false", help="skip the matmul peak")
  p.add_argument("--json", action="store_true")
  return p


if __name__ == "__main__":
  a = parser().parse_args()
  emit(run(a), a.json)
