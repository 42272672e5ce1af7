"""skipvlm: effective attention skipping and visual-token exit for LLaVA-style multimodal LLMs.

The public API. See ``shared/METHODS.md`` for the mathematics of each method and README.md for use.
"""

from skipvlm import compat, presets
from skipvlm.arch import (
    SUPPORTED_MODEL_TYPES,
    ArchFacts,
    HostFamily,
    UnsupportedModelError,
    arch_facts,
    register_host,
)
from skipvlm.eas import EASConfig, EASModel, get_eas_model
from skipvlm.encoders.eas import EncoderEASConfig, EncoderEASModel
from skipvlm.export import export_merged, load_pretrained
from skipvlm.lora import lora_target_modules
from skipvlm.merge import merge_and_unload
from skipvlm.plan import Plan, PlanField, TokenExitMethod, register_token_exit
from skipvlm.recipes import Recipe, get_recipe, recipe_names
from skipvlm.runtime import apply_plan, current_plan, exit_layers, kv_cache_bytes, use_plan
from skipvlm.search import Bandit
from skipvlm.tokens import DyVTEConfig, DyVTERouters, VTWCalibration, calibrate_vtw, train_dyvte
from skipvlm.train import SearchConfig, SearchResult, TrainConfig, search, train

__version__ = "0.1.0"

compat.check_version()  # warns once, at import, outside the tested transformers range

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ArchFacts",
    "Bandit",
    "DyVTEConfig",
    "DyVTERouters",
    "EASConfig",
    "EASModel",
    "EncoderEASConfig",
    "EncoderEASModel",
    "HostFamily",
    "Plan",
    "PlanField",
    "Recipe",
    "SearchConfig",
    "SearchResult",
    "TokenExitMethod",
    "TrainConfig",
    "UnsupportedModelError",
    "VTWCalibration",
    "__version__",
    "apply_plan",
    "arch_facts",
    "calibrate_vtw",
    "current_plan",
    "exit_layers",
    "export_merged",
    "get_eas_model",
    "get_recipe",
    "kv_cache_bytes",
    "load_pretrained",
    "lora_target_modules",
    "merge_and_unload",
    "presets",
    "recipe_names",
    "register_host",
    "register_token_exit",
    "search",
    "train",
    "train_dyvte",
    "use_plan",
]
