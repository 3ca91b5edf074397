"""GIL paper protocol on real data, 3-stage setting (in the spirit of ICol → Myel → Panc).

  python launch.py --config configs/gil_paper_3stage.py --workdir runs/paper3 \
      [--config.data.data_dir=/path/to/shared/data] [--config.method=replay]

Same pre-training cells and model as configs/gil_paper_2stage.py. Stages: base (B, half the
cells), then the crucial genes of kang_pbmc_muscat (PBMC, 5 types) → pbmc_3chem_symphony (PBMC,
9 types) → cellbench_3cl_3tech_outer (cancer cell lines, a non-immune dataset learned last like
the paper's pancreas), 1/6 of the cells each.
"""

from configs import gil_paper_2stage


def get_config():
  c = gil_paper_2stage.get_config(("kang_pbmc_muscat:cluster_id", "pbmc_3chem_symphony:cell_type",
                                   "cellbench_3cl_3tech_outer:cell_line"))
  c.experiment = "gil_paper_3stage"
  return c
