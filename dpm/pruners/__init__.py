"""Base pruners behind one small protocol (docs/design.md): select targets, score them, remove them."""

from dpm.pruners.depgraph import DepGraphPruner

__all__ = ["DepGraphPruner"]
