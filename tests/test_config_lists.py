"""List-valued config fields: tuples in configs, one reader (experiment.as_names), overrides in
every spelling, and the same fingerprint for a tuple and the equivalent comma string."""

import importlib
import os

import ml_collections
import pytest
from absl import flags

from gil_jax import checkpoint, cli
from gil_jax.canal import labels
from gil_jax.config_base import LABEL_MAP_FIELD, LIST_FIELDS, NUMBER_LIST_FIELDS, base_config
from gil_jax.data.anndata_io import DataError
from gil_jax.experiment import as_floats, as_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                 if f.endswith(".py") and f != "__init__.py")


def _get(config, field):
  node = config
  for p in field.split("."):
    node = node[p]
  return node


def _parse(*overrides, config="gil_synthetic"):
  fv = flags.FlagValues()
  argv = ["test", "--config", os.path.join(ROOT, "configs", f"{config}.py"),
          "--workdir", "/tmp/unused"] + list(overrides)
  cli.define_train_flags(fv, argv)
  cli.parse_flags(fv, argv)
  return fv.config


def test_as_names():
  assert as_names(("a", "b")) == ["a", "b"]
  assert as_names(["a", " b "]) == ["a", "b"]
  assert as_names(("a,b",)) == ["a", "b"]            # --config.x=a,b via the tuple parser
  assert as_names(("a, b", "c")) == ["a", "b", "c"]
  assert as_names("a, b,,c") == ["a", "b", "c"]      # the comma string of earlier revisions
  assert as_names("") == as_names(()) == as_names(None) == as_names(("",)) == []
  assert as_names((1, 2)) == ["1", "2"]              # --config.x=1,2 is read as numbers
  with pytest.raises(TypeError, match="tuple of names"):
    as_names({"a": 1})


def test_as_floats():
  assert as_floats((0.5, 0.25, 0.25)) == [0.5, 0.25, 0.25]
  assert as_floats((1, "0.5")) == [1.0, 0.5]
  assert as_floats("0.5, 0.5") == as_floats(("0.5,0.5",)) == [0.5, 0.5]
  assert as_floats(()) == as_floats("") == []
  with pytest.raises(DataError, match=r"config.stages.cell_ratios: 'x' is not a number"):
    as_floats(("0.5", "x"), "config.stages.cell_ratios")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_files_write_tuples(name):
  c = importlib.import_module(f"configs.{name}").get_config()
  fields = [f for f in LIST_FIELDS + NUMBER_LIST_FIELDS + (LABEL_MAP_FIELD,) if "*" not in f]
  for f in fields:
    assert isinstance(_get(c, f), tuple), (name, f, _get(c, f))
  for src in c.canal.sources.values():
    assert isinstance(src.split_values, tuple), (name, src)
  base = base_config()
  assert all(_get(base, f) == () for f in fields)


@pytest.mark.parametrize("overrides", [
    ["--config.stages.order=a,b"],                     # ml_collections: ('a,b',)
    ["--config.stages.order=a, b"],
    ['--config.stages.order=("a","b")'],
    ["--config.stages.order=['a', 'b']"],
    ["--config.stages.order=a", "--config.stages.order=b"],  # repeated flags append
])
def test_override_spellings_give_the_same_names(overrides):
  assert as_names(_parse(*overrides).stages.order) == ["a", "b"]


def test_overrides_that_the_stock_tuple_parser_rejects():
  # ':', '/', '=' or spaces next to a comma are no Python literal; kept as one element
  c = _parse("--config.canal.stage_order=panc8:celseq,baron",
             "--config.data.files=/data/a.h5ad,/data/b.h5ad",
             "--config.downstream.datasets=dA:cell_type,dB:cell_type",
             "--config.canal.label_map=alpha; beta cell=beta", config="canal_pancreas")
  assert as_names(c.canal.stage_order) == ["panc8:celseq", "baron"]
  assert as_names(c.data.files) == ["/data/a.h5ad", "/data/b.h5ad"]
  assert as_names(c.downstream.datasets) == ["dA:cell_type", "dB:cell_type"]
  assert labels.parse_label_map(c.canal.label_map) == {"alpha": "alpha", "beta cell": "beta"}
  c = _parse("--config.canal.label_map=alpha", "--config.canal.label_map=beta cell=beta",
             "--config.canal.drop_labels=CD4 T cells", config="canal_pancreas")
  assert labels.parse_label_map(c.canal.label_map) == {"alpha": "alpha", "beta cell": "beta"}
  assert as_names(c.canal.drop_labels) == ["CD4 T cells"]


def test_empty_and_numeric_overrides():
  c = _parse("--config.stages.order=", "--config.stages.cell_ratios=0.5,0.25,0.25",
             "--config.canal.withhold=()")
  assert as_names(c.stages.order) == [] and as_names(c.canal.withhold) == []
  assert as_floats(c.stages.cell_ratios) == [0.5, 0.25, 0.25]
  c = _parse("--config.canal.sources.panc8.split_values=celseq,indrop", config="canal_pancreas")
  assert as_names(c.canal.sources.panc8.split_values) == ["celseq", "indrop"]


def test_label_map_tuple_and_string_agree():
  from configs.canal_pancreas import PANCREAS_LABELS
  from configs.canal_pbmc import PBMC_LABELS
  for entries in (PANCREAS_LABELS, PBMC_LABELS):
    assert labels.parse_label_map(entries) == labels.parse_label_map("; ".join(entries))
  assert labels.parse_label_map(("a=b", "c; d=e")) == {"a": "b", "c": "c", "d": "e"}
  assert labels.parse_label_map(("CD8-positive, alpha-beta T cell=T_CD8",)) == {
      "CD8-positive, alpha-beta T cell": "T_CD8"}     # commas are part of names here
  with pytest.raises(labels.LabelError, match="more than one '='"):
    labels.parse_label_map(("a=b,c=d",))


def _as_strings(config: ml_collections.ConfigDict, sep: str = ",") -> ml_collections.ConfigDict:
  """The config as an earlier revision wrote it: list fields as comma strings."""
  d = config.to_dict()
  for f in LIST_FIELDS + NUMBER_LIST_FIELDS:
    *parents, leaf = f.split(".")
    nodes = [d]
    for p in parents:
      nodes = [c for n in nodes for c in (n.values() if p == "*" else [n[p]])]
    for n in nodes:
      n[leaf] = sep.join(str(x) for x in n[leaf])
  d["canal"]["label_map"] = "; ".join(d["canal"]["label_map"])
  return ml_collections.ConfigDict(d)


class _Saved:
  """A stand-in Checkpointer whose latest checkpoint was written with `config`."""

  def __init__(self, config):
    self.directory = "/tmp/run/checkpoints"
    self.meta = {"experiment": config.experiment, "fingerprint": checkpoint.fingerprint(config),
                 "config": checkpoint.config_for_fingerprint(config)}

  def latest_meta(self):
    return 1, self.meta


@pytest.mark.parametrize("name", ["gil_paper_3stage", "canal_pbmc"])
def test_tuple_and_comma_string_are_the_same_experiment(name):
  c = importlib.import_module(f"configs.{name}").get_config()
  with c.unlocked():
    c.stages.cell_ratios = (0.5, 0.25, 0.25)
  old = _as_strings(c)
  assert isinstance(old.stages.order, str) and isinstance(old.canal.label_map, str)
  assert checkpoint.fingerprint(old) == checkpoint.fingerprint(c)
  spaced = _as_strings(c, sep=", ")                  # 'MK, HSC': another string, same lists
  checkpoint.Checkpointer.check_same_experiment(_Saved(spaced), c)
  checkpoint.Checkpointer.check_same_experiment(_Saved(c), old)
  other = c.copy_and_resolve_references()
  with other.unlocked():
    other.stages.order = ("x",)
  with pytest.raises(checkpoint.WorkdirMismatchError, match="stages.order"):
    checkpoint.Checkpointer.check_same_experiment(_Saved(spaced), other)
