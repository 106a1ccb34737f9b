"""Typed, frozen experiment configuration: the schema (``schema.py``: the core sections, :class:`Config`),
the converter behind it (``convert.py``) and the YAML loader (``loader.py``).

Public API::

    load_config(path, overrides=(), schema=Config) -> Config (or the method's extension of it)
    restrict(cfg, schema=Config) -> the sections schema defines
    from_dict(cls, data, *, source, path="") -> cls
    to_dict(obj) -> dict
    dump_config(cfg) -> str
    save_config(cfg, path) -> Path
    config_fingerprint(cfg, sections=None) -> str
    diff_configs(a, b) -> list[str]

A method package defines its section dataclass and a run config extending :class:`Config` with it
(``jaxseg.dlb.config``, ``jaxseg.neonatal.config``); the core imports neither.
"""

from jaxseg.config.convert import ConfigError, from_dict, to_dict
from jaxseg.config.loader import (
                                  config_fingerprint,
                                  diff_configs,
                                  dump_config,
                                  load_config,
                                  restrict,
                                  save_config,
)
from jaxseg.config.schema import (
                                  Config,
                                  DataConfig,
                                  DROConfig,
                                  EvalConfig,
                                  LabelBudgetConfig,
                                  LossConfig,
                                  ModelConfig,
                                  OptimConfig,
                                  SynthConfig,
                                  SynthRunConfig,
                                  TrainConfig,
)

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "LabelBudgetConfig",
    "ModelConfig",
    "SynthConfig",
    "SynthRunConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "DROConfig",
    "EvalConfig",
    "from_dict",
    "to_dict",
    "load_config",
    "restrict",
    "dump_config",
    "save_config",
    "config_fingerprint",
    "diff_configs",
]
