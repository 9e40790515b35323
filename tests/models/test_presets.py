"""Preset parameter counts match the paper's Table 1 exactly (vocabulary of 65 characters)."""

import pytest

from models import PRESETS, build_model, count_parameters, preset
from models.config import ConfigError, LMNConfig, config_from_dict

PAPER_COUNTS = {
    "logmem-32": 71_489,
    "gpt2-32": 71_105,
    "logmem-128": 1_072_193,
    "gpt2-128": 841_281,
    "expsum-32": 71_489,
}


@pytest.mark.parametrize("name", PAPER_COUNTS)
def test_paper_parameter_counts(name):
    assert count_parameters(build_model(PRESETS[name])) == PAPER_COUNTS[name]


def test_tinylogmem_is_smaller():
    assert PRESETS["tinylogmem-32"].ff_mult == 1
    assert count_parameters(build_model(PRESETS["tinylogmem-32"])) < PAPER_COUNTS["logmem-32"]


def test_config_round_trip_and_errors():
    cfg = preset("logmem-32", vocab_size=80)
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown lmn config keys"):
        config_from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match="divisible"):
        LMNConfig(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="summarizer"):
        LMNConfig(summarizer="mlp")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("logmem-9")
