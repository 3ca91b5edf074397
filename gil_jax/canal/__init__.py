"""Continual cell-type annotation (CANAL): growing class head, example bank, novelty, CLI."""
