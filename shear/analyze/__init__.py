"""Structure analysis: which parameters must be removed together (see ``graph.py`` for the contract)."""
from shear.analyze.api import analyze, analyze_path
from shear.analyze.graph import Group, Member, PrunePlan, StructureGraph

__all__ = ["analyze", "analyze_path", "Group", "Member", "PrunePlan", "StructureGraph"]
