"""Every Hydra config composes and validates; wrong keys and types fail clearly."""

from pathlib import Path

import pipeline
import pytest
import schema
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from fhmv_jax.data import FEATURE_NAMES

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUP_OPTIONS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml")) for group in ("data", "model", "train")}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
REQUIRED = {"csv": ["data.path=market.csv"], "returns": ["data.path=returns.csv"]}
FEATURES = {"fhmv_paper": ("r",)}   # model options written for another data kind's features

schema.register()


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_groups_and_experiments_exist():
    assert GROUP_OPTIONS == {"data": ["csv", "returns", "synthetic"], "model": ["fhmv", "fhmv_paper", "gmm_hmm"],
                             "train": ["em", "quick"]}
    assert {"long", "tiny", "gmm_baseline"} <= set(EXPERIMENTS)


def test_defaults_match_the_documented_values():
    cfg = schema.validate(_compose([]))
    assert cfg.seed == 42 and cfg.data.kind == "synthetic" and cfg.data.num_steps == 1000
    assert cfg.data.train_fraction == 0.8 and cfg.model.num_components == 2
    assert cfg.train.max_iters == 50 and cfg.train.tol == 1e-4
    spec = pipeline.model_spec(cfg, tuple(FEATURE_NAMES))
    assert spec.num_states == 96 and spec.driver_feature == FEATURE_NAMES.index("P")


@pytest.mark.parametrize("group,option", [(g, o) for g, options in GROUP_OPTIONS.items() for o in options])
def test_every_group_option_composes_into_a_spec(group, option):
    cfg = schema.validate(_compose([f"{group}={option}", *REQUIRED.get(option, [])]))
    assert cfg[group] is not None
    features = FEATURES.get(option, tuple(FEATURE_NAMES))
    spec = pipeline.model_spec(cfg, features)
    assert spec.num_features == len(features)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    base = schema.validate(_compose([]))
    cfg = schema.validate(_compose([f"experiment={experiment}"]))
    assert cfg != base, "an experiment file must override something"
    pipeline.model_spec(cfg, tuple(FEATURE_NAMES))


def test_experiment_files_only_state_overrides():
    for experiment in EXPERIMENTS:
        assert (CONF / "experiment" / f"{experiment}.yaml").read_text().startswith("# @package _global_")


@pytest.mark.parametrize("override", ["data.foo=1", "train.max_iter=3", "model=nope", "train.max_iters=abc"])
def test_wrong_keys_and_types_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        _compose([override])


@pytest.mark.parametrize(
    "override,message", [("+bogus=1", "Key 'bogus' not in 'Config'"), ("+data.foo=1", "Key 'foo' not in")]
)
def test_appended_unknown_keys_fail_validation(override, message):
    with pytest.raises(ValueError, match=message):
        schema.validate(_compose([override]))


def test_unknown_init_method_is_named():
    with pytest.raises(ValueError, match="train.init_method"):
        schema.validate(_compose(["train.init_method=spectral"]))
    with pytest.raises(ValueError, match="train.inference"):
        schema.validate(_compose(["train.inference=scan"]))


def test_missing_required_value_is_named():
    with pytest.raises(ValueError, match="data.path"):
        schema.validate(_compose(["data=csv"]))


def test_bad_model_values_are_named():
    cfg = schema.validate(_compose(["model.driver=Price"]))
    with pytest.raises(ValueError, match="'Price'"):
        pipeline.model_spec(cfg, tuple(FEATURE_NAMES))
    cfg = schema.validate(_compose(["model.leverage=sideways"]))
    with pytest.raises(ValueError, match="leverage"):
        pipeline.model_spec(cfg, tuple(FEATURE_NAMES))


def test_split_rows_checks_both_parts():
    assert pipeline.split_rows(1000, 0.8, 12) == 800
    with pytest.raises(ValueError, match="train_fraction"):
        pipeline.split_rows(1000, 1.0, 12)
    with pytest.raises(ValueError, match="each part needs at least 12"):
        pipeline.split_rows(50, 0.9, 12)


def _validated(overrides):
    return schema.validate(_compose(overrides), overrides)


@pytest.mark.parametrize("data", ["synthetic", "csv"])
@pytest.mark.parametrize("setting", ["data.features.ewma_spans={}", "data.features.ewma_spans=null"])
def test_a_feature_setting_can_be_emptied_from_the_command_line(data, setting):
    overrides = [f"data={data}", *REQUIRED.get(data, []), setting]
    cfg = _validated(overrides)
    transform = pipeline.feature_transform(cfg, tuple(FEATURE_NAMES))
    assert transform.ewma_spans == () and transform.log_return == ("P",)
    assert pipeline.feature_transform(_validated([f"data={data}", *REQUIRED.get(data, [])]),
                                      tuple(FEATURE_NAMES)).ewma_spans == (("Delta", 6.0),)


def test_list_and_dict_feature_settings_take_new_values():
    cfg = _validated(["data.features.log1p=[]", "data.features.log_return=null",
                      "++data.features.ewma_spans={Vol: 12}"])
    transform = pipeline.feature_transform(cfg, tuple(FEATURE_NAMES))
    assert transform.log1p == () and transform.log_return == () and transform.ewma_spans == (("Vol", 12.0),)
    cfg = _validated(["data.features.ewma_spans.Delta=12"])
    assert pipeline.feature_transform(cfg, tuple(FEATURE_NAMES)).ewma_spans == (("Delta", 12.0),)


def test_a_dict_override_replaces_only_with_the_overrides_given():
    composed = _compose(["data.features.ewma_spans={}"])
    assert dict(schema.validate(composed).data.features.ewma_spans) == {"Delta": 6.0}   # Hydra merged it
    assert dict(schema.validate(composed, ["data.features.ewma_spans={}"]).data.features.ewma_spans) == {}
    assert schema.dict_overrides(["data=returns", "seed=3", "data.features.ewma_spans={}", "~eval"]) == {
        "data.features.ewma_spans": {}
    }


def test_the_returns_data_and_the_published_model_compose():
    cfg = _validated(["data=returns", "data.path=sp500.csv", "model=fhmv_paper"])
    assert cfg.data.kind == "returns" and cfg.data.price_column == "price" and cfg.data.return_column is None
    assert not cfg.data.standardize and cfg.model.zero_mean
    spec = pipeline.model_spec(cfg, ("r",))
    assert (spec.num_features, spec.num_regimes, spec.num_chains, spec.num_jump_states, spec.num_components) == (
        1, 1, 2, 2, 1)
    assert spec.gaussian and spec.tied_persistence and spec.jump_mode == "iid" and spec.leverage == "predictable"
    assert spec.num_leverage_lags == 70 and spec.driver_feature == 0 and spec.num_states == 8
    assert spec.zero_mean
    with pytest.raises(ValueError, match="data.path"):
        _validated(["data=returns"])
