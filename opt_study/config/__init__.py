"""The study spec: frozen config slices (`spec`), the YAML loader (`load`), search domains (`space`).

This layer sits just above `opt_study.storage` and imports no torch. It checks a study's
structure; `opt_study.validate` adds the checks against the workload and optimizer registries
and is what commands call (`validate.load_study`).
"""

from opt_study.config.load import build, load_spec, parse_spec, study_folder_spec
from opt_study.config.spec import (
    MAX_CONFIG_BYTES,
    MAX_TRIALS,
    AshaConfig,
    BudgetsConfig,
    ConfigError,
    FieldError,
    MeasureConfig,
    OptimizerSpec,
    ScaleConfig,
    ScheduleConfig,
    SearchConfig,
    Spec,
    StudyConfig,
    TargetConfig,
    TrainingConfig,
    WorkloadConfig,
    check_name,
)
from opt_study.config.yaml_file import read_yaml

__all__ = [
    "build",
    "load_spec",
    "parse_spec",
    "read_yaml",
    "study_folder_spec",
    "MAX_CONFIG_BYTES",
    "MAX_TRIALS",
    "AshaConfig",
    "BudgetsConfig",
    "ConfigError",
    "FieldError",
    "MeasureConfig",
    "OptimizerSpec",
    "ScaleConfig",
    "ScheduleConfig",
    "SearchConfig",
    "Spec",
    "StudyConfig",
    "TargetConfig",
    "TrainingConfig",
    "WorkloadConfig",
    "check_name",
]
