"""Specs of models, clusters and plans (pure Python, no torch)."""

from modelpar.specs.cluster import CLUSTER_PRESETS, ClusterSpec, DeviceSpec
from modelpar.specs.errors import SpecError
from modelpar.specs.io import from_dict, load_cluster, load_model, load_plan
from modelpar.specs.model import MODEL_PRESETS, ModelSpec
from modelpar.specs.plan import RECOMPUTE_MODES, SCHEDULES, ParallelPlan

__all__ = [
    "CLUSTER_PRESETS", "ClusterSpec", "DeviceSpec", "SpecError", "from_dict", "load_cluster", "load_model",
    "load_plan", "MODEL_PRESETS", "ModelSpec", "RECOMPUTE_MODES", "SCHEDULES", "ParallelPlan",
]
