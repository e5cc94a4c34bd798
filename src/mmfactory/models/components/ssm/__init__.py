"""Selective state-space (Mamba) components: the selective scan and the Mamba mixer."""

from mmfactory.models.components.ssm.mixer import MambaMixer
from mmfactory.models.components.ssm.scan import selective_scan, selective_scan_ref

__all__ = ["MambaMixer", "selective_scan", "selective_scan_ref"]
