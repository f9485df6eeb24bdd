"""Typed run configuration: schema, YAML loading with `base:` inheritance, overrides, checks."""

from tpt_jax.config._load import dump_yaml, load_config, save_resolved, to_dict
from tpt_jax.config._paths import check_paths, locate
from tpt_jax.config._schema import (
    CheckpointConfig,
    Config,
    CorpusConfig,
    DataConfig,
    EvalConfig,
    EvalTaskConfig,
    LoggingConfig,
    MeshConfig,
    MixtureComponent,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
    ThinkConfig,
    TrainConfig,
)
from tpt_jax.config._validate import (
    mesh_shape,
    task_names,
    topology_chips,
    validate,
    validate_for_devices,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "CorpusConfig",
    "DataConfig",
    "EvalConfig",
    "EvalTaskConfig",
    "LoggingConfig",
    "MeshConfig",
    "MixtureComponent",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "ScheduleConfig",
    "ThinkConfig",
    "TrainConfig",
    "check_paths",
    "dump_yaml",
    "load_config",
    "locate",
    "mesh_shape",
    "save_resolved",
    "task_names",
    "to_dict",
    "topology_chips",
    "validate",
    "validate_for_devices",
]
