"""PyTorch source of the LMN and its baselines: models, configs, checkpoints and training."""

from .config import PRESETS, ConfigError, GPTConfig, LMNConfig, ModelConfig, config_from_dict, preset
from .gpt import GPT, KVState
from .lmn import LMN, StepState


def build_model(cfg: ModelConfig):
    """The model a config describes."""
    return LMN(cfg) if isinstance(cfg, LMNConfig) else GPT(cfg)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "GPT", "LMN", "PRESETS", "ConfigError", "GPTConfig", "KVState", "LMNConfig", "ModelConfig",
    "StepState", "build_model", "config_from_dict", "count_parameters", "preset",
]
