"""Novelty setting of the pancreas stream: 'alpha' (as in CANAL's novel-cell tutorial) is withheld
from every training stage and present in the held-out test cells, where it should be flagged
"Unassigned".
Run: python -m gil_jax.cli train --config configs/canal_novelty.py --workdir runs/canal_novelty

Rule: 'mahalanobis' -- a cell's score is the smallest Mahalanobis distance of its manifold
vector m to a known type's mean (means and pooled covariance from the training cells), flagged
above the 0.95-quantile of the validation cells' scores (the conventional operating point that
keeps 95 % of known cells; gil_jax/canal/novelty.py). Over seeds 1-4 (seed 0 was used to diagnose
the previous rule) H 0.69 +- 0.20 against 0.37 +- 0.17 for 'validation_auto', the previous
default, whose leave-one-class-out choice of q picked 0.99 on 4 of 5 seeds (README: Novelty).
Alternatives: --config.canal.novelty_rule=validation_auto | validation (energy + confidence score,
q = --config.canal.novelty_quantile) | canal (CANAL's transductive mixup threshold).
History, stated for honesty: q=0.9 was once picked by hand after seeing test H-scores; that
choice used test labels and is not used.
"""

from configs import canal_pancreas


def get_config():
  c = canal_pancreas.get_config()
  c.experiment = "canal_pancreas_novelty"
  c.canal.withhold = ("alpha",)
  c.canal.novelty_rule = "mahalanobis"
  c.canal.novelty_quantile = 0.95
  return c
