"""CANAL continual annotation on a PBMC stream (real data from ../shared/data).

Stages: pbmc_3chem_symphony split by chemistry (`donor`: 3pv1, 3pv2, 5p), then Kang (muscat
subset, `cluster_id`), then the scAnnotate Drop-seq file; the scAnnotate inDrops file is
test-only. Names are harmonised by the label map (e.g. 'CD4 T cells' -> T_CD4, 'Cytotoxic T cell'
-> T_CD8, 'CD16+ monocyte' -> Mono_CD16); the rare MK and HSC cells (7 and 3) are dropped.
Run: python -m gil_jax.cli train --config configs/canal_pbmc.py --workdir runs/canal_pbmc
"""

from configs.canal_pancreas import _src
from configs import canal_pancreas

PBMC_LABELS = ("T_CD4", "T_CD8", "B", "Mono_CD14", "Mono_CD16", "NK", "DC",
               "CD4 T cells=T_CD4", "CD8 T cells=T_CD8", "B cells=B", "CD14+ Monocytes=Mono_CD14",
               "FCGR3A+ Monocytes=Mono_CD16", "Cytotoxic T cell=T_CD8", "B cell=B",
               "CD16+ monocyte=Mono_CD16")


def get_config():
  c = canal_pancreas.get_config()
  c.experiment = "canal_pbmc"
  c.canal.sources = {
      "symphony": _src("pbmc_3chem_symphony", "cell_type", "log1p_cp10k",
                       split_column="donor", split_values=("3pv1", "3pv2", "5p")),
      "kang": _src("kang_pbmc_muscat", "cluster_id", "log1p_cp10k"),
      "dropseq": _src("pbmc_dropseq_scAnnotate", "cell_type", "none"),
      "indrops": _src("pbmc_indrops_scAnnotate", "cell_type", "none"),
  }
  c.canal.stage_order = ("symphony:3pv1", "symphony:3pv2", "symphony:5p", "kang", "dropseq")
  c.canal.test_only = ("indrops",)
  c.canal.label_map = PBMC_LABELS
  c.canal.drop_labels = ("MK", "HSC")
  c.genes.capacity = 8192
  return c
