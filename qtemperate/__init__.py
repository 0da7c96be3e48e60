"""qtemperate: quantization-aware distillation for PyTorch.

Structured pruning (torch-pruning), Brevitas QAT in bit-width stages and Temperate
distillation — dynamic, multi-scale temperatures coupled to the bit-width stages —
in one recipe. The public API is listed in ``__all__``; the light core (losses,
schedules, the joint scheduler, recipes) is imported eagerly, the modules that pull
in Brevitas, torch-pruning, onnxruntime or wandb are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qtemperate.joint_scheduler import BitDropCoupling as BitDropCoupling
from qtemperate.joint_scheduler import BitStage as BitStage
from qtemperate.joint_scheduler import CouplingRule as CouplingRule
from qtemperate.joint_scheduler import JointScheduler as JointScheduler
from qtemperate.joint_scheduler import NoCoupling as NoCoupling
from qtemperate.joint_scheduler import StageState as StageState
from qtemperate.losses import TemperateLoss as TemperateLoss
from qtemperate.losses import kd_loss as kd_loss
from qtemperate.losses import multi_scale_kd_loss as multi_scale_kd_loss
from qtemperate.losses import normalize_weights as normalize_weights
from qtemperate.recipe import Recipe as Recipe
from qtemperate.recipe import RecipeError as RecipeError
from qtemperate.recipe import load_recipe as load_recipe
from qtemperate.registry import Registry as Registry
from qtemperate.temperature import TEMPERATURE_SCHEDULES as TEMPERATURE_SCHEDULES
from qtemperate.temperature import ConstantTemperature as ConstantTemperature
from qtemperate.temperature import GradientNormTemperature as GradientNormTemperature
from qtemperate.temperature import LookupTableTemperature as LookupTableTemperature
from qtemperate.temperature import TemperateSchedule as TemperateSchedule
from qtemperate.temperature import TemperatureSchedule as TemperatureSchedule
from qtemperate.temperature import TemperatureSuggestion as TemperatureSuggestion
from qtemperate.temperature import suggest_initial_temperature as suggest_initial_temperature
from qtemperate.temperature import to_lookup_table as to_lookup_table

if TYPE_CHECKING:
    from qtemperate.export import benchmark_onnx as benchmark_onnx
    from qtemperate.export import export_onnx as export_onnx
    from qtemperate.export import verify_onnx as verify_onnx
    from qtemperate.models import build_model as build_model
    from qtemperate.planner import plan_recipe as plan_recipe
    from qtemperate.planner import plan_student as plan_student
    from qtemperate.pruning import PruneReport as PruneReport
    from qtemperate.pruning import prune as prune
    from qtemperate.quantization import quantize as quantize
    from qtemperate.quantization import set_bit_width as set_bit_width
    from qtemperate.size import SizeReport as SizeReport
    from qtemperate.size import model_size as model_size
    from qtemperate.trainer import Trainer as Trainer

__version__ = "0.1.0.dev0"

# Heavy parts: name -> module, imported on first attribute access (PEP 562).
_LAZY = {
    "build_model": "qtemperate.models",
    "prune": "qtemperate.pruning",
    "PruneReport": "qtemperate.pruning",
    "quantize": "qtemperate.quantization",
    "set_bit_width": "qtemperate.quantization",
    "model_size": "qtemperate.size",
    "SizeReport": "qtemperate.size",
    "export_onnx": "qtemperate.export",
    "verify_onnx": "qtemperate.export",
    "benchmark_onnx": "qtemperate.export",
    "plan_student": "qtemperate.planner",
    "plan_recipe": "qtemperate.planner",
    "Trainer": "qtemperate.trainer",
}

__all__ = [
    "TEMPERATURE_SCHEDULES",
    "BitDropCoupling",
    "BitStage",
    "ConstantTemperature",
    "CouplingRule",
    "GradientNormTemperature",
    "JointScheduler",
    "LookupTableTemperature",
    "NoCoupling",
    "PruneReport",
    "Recipe",
    "RecipeError",
    "Registry",
    "SizeReport",
    "StageState",
    "TemperateLoss",
    "TemperateSchedule",
    "TemperatureSchedule",
    "TemperatureSuggestion",
    "Trainer",
    "benchmark_onnx",
    "build_model",
    "export_onnx",
    "kd_loss",
    "load_recipe",
    "model_size",
    "multi_scale_kd_loss",
    "normalize_weights",
    "plan_recipe",
    "plan_student",
    "prune",
    "quantize",
    "set_bit_width",
    "suggest_initial_temperature",
    "to_lookup_table",
    "verify_onnx",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qtemperate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
