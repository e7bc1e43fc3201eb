"""Learned hard-concrete masks toward a target shape (Sheared-LLaMA, Xia et al. 2024; FIELD-NOTES §4)."""
from shear.shearing.finish import finish_
from shear.shearing.masks import HardConcrete, ShearMasks, attach_masks
from shear.shearing.target import Lagrangian, TargetShape, resolve_target
from shear.shearing.term import ShearingTerm
from shear.shearing.train import ShearTrainConfig, train_masks

__all__ = ["HardConcrete", "ShearMasks", "attach_masks", "Lagrangian", "TargetShape", "resolve_target",
           "ShearTrainConfig", "train_masks", "finish_", "ShearingTerm"]
