"""Novelty setting of the pancreas stream: 'alpha' (as in CANAL's novel-cell tutorial) is withheld
from every training stage and present in the held-out test cells, where it should be flagged
"Unassigned" by CANAL's energy/max-probability score and mixup threshold.
Run: python -m gil_jax.cli train --config configs/canal_novelty.py --workdir runs/canal_novelty
"""

from configs import canal_pancreas


def get_config():
  c = canal_pancreas.get_config()
  c.experiment = "canal_pancreas_novelty"
  c.canal.withhold = "alpha"
  return c
