"""The recipe: one typed, validated tree per pipeline run.

A recipe is YAML, parsed into :class:`Recipe` (pydantic v2, ``extra="forbid"``), so a typo, a wrong
type or an impossible budget fails before any compute with the field path and the fix in one line
(:func:`load_recipe` raises :class:`~nemoforge.errors.RecipeError`). Built-in recipes ship as package
data under ``nemoforge/recipes/``; ``--set key.path=value`` overrides fields of any recipe. A recipe may
extend another with a top-level ``base:`` (a built-in name, or a YAML path relative to the file): the two are
deep-merged, the child's mappings overriding the base's key by key, its lists and scalars replacing the base's.

This package's names are the recipe's public API; its modules, by job:

- :mod:`~nemoforge.config.base`: the sections' base model, the stage names, the reasoning mode;
- :mod:`~nemoforge.config.inputs`: ``model`` (the parent) and ``data``;
- :mod:`~nemoforge.config.stages`: one section per stage (nas, distill, cpt, sft, rl, eval, serve);
- :mod:`~nemoforge.config.resources`: ``resources`` (Kubernetes, DeepSpeed, TrainJob) and its checks;
- :mod:`~nemoforge.config.stores`: ``tracking`` and ``storage``;
- :mod:`~nemoforge.config.recipe`: :class:`Recipe`, with the rules that span sections;
- :mod:`~nemoforge.config.loading`: built-in recipes, the ``base:`` merge, ``--set``, validation errors.
"""

from nemoforge.config.base import PREPARATION_STEPS, STAGES, ReasoningMode
from nemoforge.config.inputs import (
    ArithmeticTask,
    DataConfig,
    ModelConfig,
    ParentArchitecture,
    ParentModel,
    TeacherCorpus,
)
from nemoforge.config.loading import builtin_recipes, load_recipe
from nemoforge.config.recipe import Recipe
from nemoforge.config.resources import (
    DATA_PARALLEL_STAGES,
    ONE_GPU_STAGES,
    ONE_POD_STAGES,
    DeepSpeedConfig,
    ImageSet,
    ResourcesConfig,
    StageResources,
    Toleration,
    TrainerConfig,
)
from nemoforge.config.stages import (
    GATE_METRICS,
    REWARD_NAMES,
    BLDConfig,
    CorpusTrainConfig,
    CostConfig,
    CPTConfig,
    DistillConfig,
    EvalConfig,
    FFNFusionConfig,
    GateConfig,
    NASConfig,
    PreferenceConfig,
    RLConfig,
    ScoringConfig,
    ServeConfig,
    SFTConfig,
    TokenTrainConfig,
    TrainConfig,
)
from nemoforge.config.stores import StorageConfig, TrackingConfig

__all__ = [
    "DATA_PARALLEL_STAGES",
    "GATE_METRICS",
    "ONE_GPU_STAGES",
    "ONE_POD_STAGES",
    "PREPARATION_STEPS",
    "REWARD_NAMES",
    "STAGES",
    "ArithmeticTask",
    "BLDConfig",
    "CPTConfig",
    "CorpusTrainConfig",
    "CostConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "DistillConfig",
    "EvalConfig",
    "FFNFusionConfig",
    "GateConfig",
    "ImageSet",
    "ModelConfig",
    "NASConfig",
    "ParentArchitecture",
    "ParentModel",
    "PreferenceConfig",
    "RLConfig",
    "ReasoningMode",
    "Recipe",
    "ResourcesConfig",
    "SFTConfig",
    "ScoringConfig",
    "ServeConfig",
    "StageResources",
    "StorageConfig",
    "TeacherCorpus",
    "Toleration",
    "TokenTrainConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainerConfig",
    "builtin_recipes",
    "load_recipe",
]
