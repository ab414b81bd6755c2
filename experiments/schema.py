"""Typed schemas of the Hydra configuration (conf/), registered in Hydra's ConfigStore.

Every group file names its schema in its defaults list, so a key that is not declared
here, or a value of the wrong type, fails at composition time, before any work starts.

The group files (conf/) carry the values; a schema's defaults are only a fallback, and for
feature settings they are empty, so that nothing a file or the command line removed comes
back when ``validate`` merges the config into its schema. A dict given on the command line
(``data.features.ewma_spans={}``) replaces the setting when ``validate`` is handed the
overrides: Hydra itself merges a dict override into the file's dict, so ``{}`` would
otherwise drop nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fhmv_jax.data import DEFAULT_FREQUENCIES, FEATURE_NAMES, REGIME_NAMES
from fhmv_jax.em.init import INIT_METHODS
from fhmv_jax.inference import METHODS


@dataclass
class FeaturesConfig:
    """Causal feature processing (each setting ``null``, ``[]`` or ``{}`` for none).

    No defaults here: the data group files carry the values.
    """

    log_return: list[str] | None = field(default_factory=list)
    log1p: list[str] | None = field(default_factory=list)
    ewma_spans: dict[str, float] | None = field(default_factory=dict)


@dataclass
class SyntheticDataConfig:
    """The simulated market of DATA.md."""

    kind: str = "synthetic"
    num_steps: int = 1000
    train_fraction: float = 0.8
    persistence: float = 0.85
    frequencies: list[float] = field(default_factory=lambda: list(DEFAULT_FREQUENCIES))
    start: str = "2023-01-01T00"
    standardize: bool = True
    features: FeaturesConfig = field(default_factory=FeaturesConfig)


@dataclass
class CsvDataConfig:
    """A CSV file with one row per step (and optionally a column of true regime names)."""

    kind: str = "csv"
    path: str = MISSING
    feature_columns: list[str] = field(default_factory=lambda: list(FEATURE_NAMES))
    timestamp_column: str | None = "timestamp"
    regime_column: str | None = None
    regime_names: list[str] = field(default_factory=lambda: list(REGIME_NAMES))
    train_fraction: float = 0.8
    standardize: bool = True
    features: FeaturesConfig = field(default_factory=FeaturesConfig)


@dataclass
class ReturnsDataConfig:
    """A daily series from a CSV file: a date column and either a price or a return column.

    Prices become percent log returns 100 diff(log p); a return column is used as it is.
    The model sees one feature, ``r``.
    """

    kind: str = "returns"
    path: str = MISSING
    date_column: str = "date"
    price_column: str | None = "price"
    return_column: str | None = None
    sort_dates: bool = True
    max_gap_days: int | None = 5
    train_fraction: float = 0.8
    standardize: bool = False
    features: FeaturesConfig = field(default_factory=FeaturesConfig)


@dataclass
class ModelConfig:
    """ModelSpec fields (MODEL.md); features are named, the count comes from the data."""

    num_regimes: int = 6
    num_chains: int = 2
    num_jump_states: int = 2
    num_components: int = 2
    leverage: str = "markov"
    num_leverage_lags: int = 70
    jump_mode: str = "markov"
    zero_mean: bool = False
    tied_persistence: bool = True
    gaussian: bool = False
    driver: str | None = "P"
    scale_features: list[str] | None = None
    dof_bounds: list[float] = field(default_factory=lambda: [2.01, 100.0])


@dataclass
class TrainConfig:
    """fit_em and init_model settings."""

    max_iters: int = 50
    tol: float = 1e-4
    num_restarts: int = 1
    init_method: str = "hmm"
    init_seeds: int = 5
    hmm_iters: int = 30
    split_merge_rounds: int = 3
    split_merge_iters: int = 10
    covariance_ridge: float = 1e-2
    covariance_prior_count: float = 1e-2
    inference: str = "auto"
    batch_chunk: int | None = None


@dataclass
class EvalConfig:
    """Read-outs and outputs."""

    ambiguity_threshold: float = 0.6
    dashboard: bool = True


@dataclass
class IncrementalConfig:
    """Retraining monitors and settings (fhmv_jax.incremental), and the replay of experiments/incremental.py."""

    every: int | None = 250
    log_likelihood_drop: float | None = 2.0
    accuracy_drop: float | None = 0.10
    drift_psi: float | None = 0.5
    anomaly_z: float | None = 4.0
    recent: int = 250
    max_iters: int = 15
    tol: float = 1e-4
    window: int = 2000
    validation: int = 100
    margin: float = 0.02
    stream_steps: int = 2000
    chunk: int = 50
    shifted_frequencies: list[float] = field(default_factory=lambda: [0.10, 0.10, 0.10, 0.30, 0.30, 0.10])


@dataclass
class Config:
    """The main job's configuration."""

    seed: int = 42
    data: Any = MISSING
    model: ModelConfig = MISSING
    train: TrainConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)


def register() -> None:
    """Store the schemas under the names the group files' defaults lists use."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    store.store(group="data", name="synthetic_schema", node=SyntheticDataConfig)
    store.store(group="data", name="csv_schema", node=CsvDataConfig)
    store.store(group="data", name="returns_schema", node=ReturnsDataConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="train", name="train_schema", node=TrainConfig)


_DATA_SCHEMAS = {"synthetic": SyntheticDataConfig, "csv": CsvDataConfig, "returns": ReturnsDataConfig}


def dict_overrides(overrides: Sequence[str]) -> dict[str, dict]:
    """The command-line overrides whose value is a dict (``key={...}``), by key; Hydra's own keys left out."""
    found = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.is_delete() or override.is_sweep_override() or override.key_or_group.startswith("hydra"):
            continue
        value = override.value()
        if isinstance(value, dict):
            found[override.key_or_group] = value
    return found


def _open_free_dicts(node: DictConfig) -> None:
    """Let dict-typed settings (``ewma_spans``: names chosen by the user) take any key; dataclass nodes stay strict."""
    for key in node:
        child = None if OmegaConf.is_missing(node, key) else node[key]
        if isinstance(child, DictConfig):
            if OmegaConf.get_type(child) is dict:
                OmegaConf.set_struct(child, False)
            else:
                _open_free_dicts(child)


def validate(cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """Check a composed config against the schemas, keys added with ``+`` included.

    Args:
        cfg: the composed config.
        overrides: the command-line overrides it was composed with (``HydraConfig.get().overrides.task``
            in an entry point). A dict value among them replaces the setting instead of being merged
            into it, so ``data.features.ewma_spans={}`` leaves no EWMA feature.

    Returns:
        The config merged into its typed schema (read-only).

    Raises:
        ValueError: an unknown key, a wrong type or a missing required value, named.
    """
    kind = cfg.get("data", {}).get("kind")
    if kind not in _DATA_SCHEMAS:
        raise ValueError(f"data.kind must be one of {sorted(_DATA_SCHEMAS)}, got {kind!r}")
    schema = OmegaConf.structured(Config)
    schema.data = OmegaConf.structured(_DATA_SCHEMAS[kind])
    OmegaConf.set_struct(schema, True)
    _open_free_dicts(schema)
    try:
        plain = OmegaConf.create(OmegaConf.to_container(cfg))
        for key, value in dict_overrides(overrides).items():
            OmegaConf.update(plain, key, value, merge=False)
        merged = OmegaConf.merge(schema, OmegaConf.to_container(plain))
        OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        raise ValueError(f"invalid configuration: {error}") from None
    if merged.train.init_method not in INIT_METHODS:
        raise ValueError(f"train.init_method must be one of {list(INIT_METHODS)}, got {merged.train.init_method!r}")
    if merged.train.inference not in METHODS:
        raise ValueError(f"train.inference must be one of {list(METHODS)}, got {merged.train.inference!r}")
    OmegaConf.set_readonly(merged, True)
    return merged
