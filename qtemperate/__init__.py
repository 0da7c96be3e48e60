"""qtemperate: quantization-aware distillation for PyTorch.

Structured pruning (torch-pruning), Brevitas QAT in bit-width stages and Temperate
distillation — dynamic, multi-scale temperatures coupled to the bit-width stages —
in one recipe. The public API is listed in ``__all__``; the light core (losses,
schedules, the joint scheduler, recipes) is imported eagerly, the modules that pull
in Brevitas, torch-pruning, onnxruntime or wandb are imported on first use.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from qtemperate.heads import TASK_LOSSES as TASK_LOSSES
from qtemperate.heads import HeadLoss as HeadLoss
from qtemperate.heads import Task as Task
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
from qtemperate.temperature import ScheduleSettings as ScheduleSettings
from qtemperate.temperature import StageContext as StageContext
from qtemperate.temperature import TemperateSchedule as TemperateSchedule
from qtemperate.temperature import TemperatureSchedule as TemperatureSchedule
from qtemperate.temperature import TemperatureSuggestion as TemperatureSuggestion
from qtemperate.temperature import settings_model as settings_model
from qtemperate.temperature import suggest_initial_temperature as suggest_initial_temperature
from qtemperate.temperature import to_lookup_table as to_lookup_table

if TYPE_CHECKING:
    from qtemperate.checkpoint import load_student as load_student
    from qtemperate.checkpoint import save_student as save_student
    from qtemperate.checkpoint import upgrade_student as upgrade_student
    from qtemperate.compare import compare_runs as compare_runs
    from qtemperate.compare import pareto_front as pareto_front
    from qtemperate.compare import pareto_plot as pareto_plot
    from qtemperate.data import DATASETS as DATASETS
    from qtemperate.data import DataBundle as DataBundle
    from qtemperate.data import DatasetInfo as DatasetInfo
    from qtemperate.data import EpochSeededSampler as EpochSeededSampler
    from qtemperate.data import build_datasets as build_datasets
    from qtemperate.data import build_run_loaders as build_run_loaders
    from qtemperate.data import check_data_available as check_data_available
    from qtemperate.data import dataset_info as dataset_info
    from qtemperate.data import make_loaders as make_loaders
    from qtemperate.errors import BadInput as BadInput
    from qtemperate.errors import CheckpointError as CheckpointError
    from qtemperate.errors import DiskFull as DiskFull
    from qtemperate.errors import EnvironmentProblem as EnvironmentProblem
    from qtemperate.errors import QtemperateError as QtemperateError
    from qtemperate.errors import RunFolderBusy as RunFolderBusy
    from qtemperate.export import VerifyReport as VerifyReport
    from qtemperate.export import benchmark_onnx as benchmark_onnx
    from qtemperate.export import export_and_check as export_and_check
    from qtemperate.export import export_onnx as export_onnx
    from qtemperate.export import verify_onnx as verify_onnx
    from qtemperate.latency import LatencySpec as LatencySpec
    from qtemperate.latency import predict_latency as predict_latency
    from qtemperate.models import MODELS as MODELS
    from qtemperate.models import ResidualAdd as ResidualAdd
    from qtemperate.models import build_model as build_model
    from qtemperate.models import list_models as list_models
    from qtemperate.models import resolve_model as resolve_model
    from qtemperate.planner import PlanReport as PlanReport
    from qtemperate.planner import plan_recipe as plan_recipe
    from qtemperate.planner import plan_student as plan_student
    from qtemperate.plots import schedule_figure as schedule_figure
    from qtemperate.preflight import preflight as preflight
    from qtemperate.pruning import IMPORTANCES as IMPORTANCES
    from qtemperate.pruning import PruneReport as PruneReport
    from qtemperate.pruning import count_params_macs as count_params_macs
    from qtemperate.pruning import prune as prune
    from qtemperate.pruning import pruning_plan as pruning_plan
    from qtemperate.pruning import recalibrate_batchnorm as recalibrate_batchnorm
    from qtemperate.quantization import QuantConfig as QuantConfig
    from qtemperate.quantization import QuantizationReport as QuantizationReport
    from qtemperate.quantization import ResidualAddMarker as ResidualAddMarker
    from qtemperate.quantization import activation_ranges_frozen as activation_ranges_frozen
    from qtemperate.quantization import freeze_activation_ranges as freeze_activation_ranges
    from qtemperate.quantization import get_bit_widths as get_bit_widths
    from qtemperate.quantization import get_quant_config as get_quant_config
    from qtemperate.quantization import quantization_report as quantization_report
    from qtemperate.quantization import quantize as quantize
    from qtemperate.quantization import set_bit_width as set_bit_width
    from qtemperate.schedule_switches import ModelFacts as ModelFacts
    from qtemperate.schedule_switches import no_feedback_path as no_feedback_path
    from qtemperate.schedule_switches import resolve_switches as resolve_switches
    from qtemperate.size import SizeReport as SizeReport
    from qtemperate.size import count_macs as count_macs
    from qtemperate.size import model_size as model_size
    from qtemperate.sweep import parse_grid as parse_grid
    from qtemperate.sweep import plan_sweep as plan_sweep
    from qtemperate.sweep import run_sweep as run_sweep
    from qtemperate.tracking import ConsoleLogger as ConsoleLogger
    from qtemperate.tracking import JsonlLogger as JsonlLogger
    from qtemperate.tracking import MetricLogger as MetricLogger
    from qtemperate.tracking import MultiLogger as MultiLogger
    from qtemperate.tracking import WandbLogger as WandbLogger
    from qtemperate.tracking import build_loggers as build_loggers
    from qtemperate.tracking.wandb_reader import read_wandb_run as read_wandb_run
    from qtemperate.trainer import Trainer as Trainer
    from qtemperate.trainer import TrainingDiverged as TrainingDiverged

__version__ = "0.1.0.dev0"

# Brevitas warns on import that an optional CUDA kernel package is missing; it is
# irrelevant to QAT here and would print on every CLI run.
warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")

# Heavy parts: name -> module, imported on first attribute access (PEP 562).
_LAZY = {
    "build_model": "qtemperate.models",
    "prune": "qtemperate.pruning",
    "LatencySpec": "qtemperate.latency",
    "predict_latency": "qtemperate.latency",
    "PruneReport": "qtemperate.pruning",
    "quantize": "qtemperate.quantization",
    "set_bit_width": "qtemperate.quantization",
    "freeze_activation_ranges": "qtemperate.quantization",
    "activation_ranges_frozen": "qtemperate.quantization",
    "model_size": "qtemperate.size",
    "SizeReport": "qtemperate.size",
    "export_onnx": "qtemperate.export",
    "export_and_check": "qtemperate.export",
    "DatasetInfo": "qtemperate.data",
    "dataset_info": "qtemperate.data",
    "build_run_loaders": "qtemperate.data",
    "verify_onnx": "qtemperate.export",
    "benchmark_onnx": "qtemperate.export",
    "plan_student": "qtemperate.planner",
    "plan_recipe": "qtemperate.planner",
    "Trainer": "qtemperate.trainer",
    "list_models": "qtemperate.models",
    "MODELS": "qtemperate.models",
    "ResidualAdd": "qtemperate.models",
    "IMPORTANCES": "qtemperate.pruning",
    "count_params_macs": "qtemperate.pruning",
    "recalibrate_batchnorm": "qtemperate.pruning",
    "pruning_plan": "qtemperate.pruning",
    "get_bit_widths": "qtemperate.quantization",
    "get_quant_config": "qtemperate.quantization",
    "QuantConfig": "qtemperate.quantization",
    "ResidualAddMarker": "qtemperate.quantization",
    "QuantizationReport": "qtemperate.quantization",
    "quantization_report": "qtemperate.quantization",
    "VerifyReport": "qtemperate.export",
    "count_macs": "qtemperate.size",
    "DATASETS": "qtemperate.data",
    "DataBundle": "qtemperate.data",
    "build_datasets": "qtemperate.data",
    "make_loaders": "qtemperate.data",
    "EpochSeededSampler": "qtemperate.data",
    "check_data_available": "qtemperate.data",
    "MetricLogger": "qtemperate.tracking",
    "JsonlLogger": "qtemperate.tracking",
    "ConsoleLogger": "qtemperate.tracking",
    "WandbLogger": "qtemperate.tracking",
    "MultiLogger": "qtemperate.tracking",
    "build_loggers": "qtemperate.tracking",
    "PlanReport": "qtemperate.planner",
    "load_student": "qtemperate.checkpoint",
    "save_student": "qtemperate.checkpoint",
    "upgrade_student": "qtemperate.checkpoint",
    "QtemperateError": "qtemperate.errors",
    "BadInput": "qtemperate.errors",
    "CheckpointError": "qtemperate.errors",
    "EnvironmentProblem": "qtemperate.errors",
    "DiskFull": "qtemperate.errors",
    "RunFolderBusy": "qtemperate.errors",
    "compare_runs": "qtemperate.compare",
    "pareto_front": "qtemperate.compare",
    "pareto_plot": "qtemperate.compare",
    "schedule_figure": "qtemperate.plots",
    "ModelFacts": "qtemperate.schedule_switches",
    "no_feedback_path": "qtemperate.schedule_switches",
    "resolve_switches": "qtemperate.schedule_switches",
    "parse_grid": "qtemperate.sweep",
    "plan_sweep": "qtemperate.sweep",
    "run_sweep": "qtemperate.sweep",
    "read_wandb_run": "qtemperate.tracking.wandb_reader",
    "preflight": "qtemperate.preflight",
    "TrainingDiverged": "qtemperate.trainer",
    "resolve_model": "qtemperate.models",
}

__all__ = [
    "DATASETS",
    "IMPORTANCES",
    "MODELS",
    "TASK_LOSSES",
    "TEMPERATURE_SCHEDULES",
    "BadInput",
    "BitDropCoupling",
    "BitStage",
    "CheckpointError",
    "ConsoleLogger",
    "ConstantTemperature",
    "CouplingRule",
    "DataBundle",
    "DatasetInfo",
    "DiskFull",
    "EnvironmentProblem",
    "EpochSeededSampler",
    "GradientNormTemperature",
    "HeadLoss",
    "JointScheduler",
    "JsonlLogger",
    "LatencySpec",
    "LookupTableTemperature",
    "MetricLogger",
    "ModelFacts",
    "MultiLogger",
    "NoCoupling",
    "PlanReport",
    "PruneReport",
    "QtemperateError",
    "QuantConfig",
    "QuantizationReport",
    "Recipe",
    "RecipeError",
    "Registry",
    "ResidualAdd",
    "ResidualAddMarker",
    "RunFolderBusy",
    "ScheduleSettings",
    "SizeReport",
    "StageContext",
    "StageState",
    "Task",
    "TemperateLoss",
    "TemperateSchedule",
    "TemperatureSchedule",
    "TemperatureSuggestion",
    "Trainer",
    "TrainingDiverged",
    "VerifyReport",
    "WandbLogger",
    "activation_ranges_frozen",
    "benchmark_onnx",
    "build_datasets",
    "build_loggers",
    "build_model",
    "build_run_loaders",
    "check_data_available",
    "compare_runs",
    "count_macs",
    "count_params_macs",
    "dataset_info",
    "export_and_check",
    "export_onnx",
    "freeze_activation_ranges",
    "get_bit_widths",
    "get_quant_config",
    "kd_loss",
    "list_models",
    "load_recipe",
    "load_student",
    "make_loaders",
    "model_size",
    "multi_scale_kd_loss",
    "no_feedback_path",
    "normalize_weights",
    "pareto_front",
    "pareto_plot",
    "parse_grid",
    "plan_recipe",
    "plan_student",
    "plan_sweep",
    "predict_latency",
    "preflight",
    "prune",
    "pruning_plan",
    "quantization_report",
    "quantize",
    "read_wandb_run",
    "recalibrate_batchnorm",
    "resolve_model",
    "resolve_switches",
    "run_sweep",
    "save_student",
    "schedule_figure",
    "set_bit_width",
    "settings_model",
    "suggest_initial_temperature",
    "to_lookup_table",
    "upgrade_student",
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
