"""Physical slicing of structure-graph groups and exports that ``from_pretrained`` loads."""
from shear.prune.export import export
from shear.prune.slice import mask_, prune_

__all__ = ["prune_", "mask_", "export"]
