"""Preset parameter counts match the paper's Table 1 exactly (vocabulary of 65 characters); logmem-512,
which is not in the paper, matches the count of the same family's formula, which reproduces the paper's."""

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


def logmem_parameters(width: int) -> int:
    """Parameters of the logmem family (4 layers, 2 banks, FF 4E, vocabulary 65) at width E:
    per layer 16E^2 + 13E (summarizer 2 banks x 2E x E + 2E, attention 4E^2 + 4E, FF 8E^2 + 5E,
    two norm scales 2E), plus the embedding 65E, the head 65E + 65 and the final norm 2E."""
    return 4 * (16 * width**2 + 13 * width) + 65 * width + 65 * width + 65 + 2 * width


def test_logmem_512_follows_the_paper_family():
    """logmem-512 is not in the paper: its count is checked against the family formula, which is
    itself checked against the paper's LogMem-32 and LogMem-128 counts."""
    assert logmem_parameters(32) == PAPER_COUNTS["logmem-32"]
    assert logmem_parameters(128) == PAPER_COUNTS["logmem-128"]
    assert logmem_parameters(512) == 16_871_489
    assert count_parameters(build_model(PRESETS["logmem-512"])) == logmem_parameters(512)
    cfg = PRESETS["logmem-512"]
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.n_bank, cfg.ff_mult) == (512, 8, 4, 2, 4)


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
