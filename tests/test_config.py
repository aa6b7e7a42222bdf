"""Config parsing (typed key=value, flags, locking) and `validate` errors."""

import json

import pytest

from petsr_jax.config import ConfigError, build_config, validate


def test_paper_protocol_is_the_default():
    deepsr, srcnn = build_config("deepsr"), build_config("srcnn")
    assert (deepsr.train.lr, srcnn.train.lr) == (1e-4, 1e-3)
    assert deepsr.train.epochs == 50 and deepsr.data.split == "20/4/9"
    assert (deepsr.model.num_blocks, deepsr.model.width, deepsr.model.global_skip) == (
        20,
        64,
        "feature",
    )
    assert deepsr.model.init == "torch" and deepsr.model.residual_scale == 1.0


def test_arg_parses_typed_values_flags_and_short_keys():
    c = build_config("deepsr", "scale=12,quick,lr=3e-4,model.global_skip=feature,flip=false")
    assert c.scale == 12 and isinstance(c.scale, int)
    assert c.train.lr == 3e-4 and c.data.cohort == "small"
    assert c.model.global_skip == "feature" and c.data.flip is False
    # Flags apply before key=value pairs whatever their order.
    assert build_config("deepsr", "model.num_blocks=9,quick").model.num_blocks == 9


@pytest.mark.parametrize(
    "arg,message",
    [
        ("scael=8", "unknown config field 'scael'"),
        ("fast", "unknown config flag 'fast'"),
        ("scale=eight", "expected int"),
        ("flip=maybe", "expected true/false"),
    ],
)
def test_bad_args_are_rejected_with_the_reason(arg, message):
    with pytest.raises((KeyError, ValueError), match=message):
        build_config("deepsr", arg)


def test_config_is_locked_against_typos():
    c = build_config("srcnn")
    c.train.lr = 3e-4  # existing field: fine (what --config.train.lr does)
    with pytest.raises(AttributeError):
        c.train.lrr = 1.0


def test_config_serialises_to_json():
    c = build_config("deepsr", "quick")
    assert json.loads(c.to_json())["model"]["num_blocks"] == 6


@pytest.mark.parametrize(
    "arg,field",
    [
        ("scale=1", "scale"),
        ("scale=200", "scale"),
        ("train.batch_size=6", "train.batch_size"),
        ("data.root=/nonexistent/petsr", "data.root"),
        ("data.split=20/4", "data.split"),
        ("data.eval_slices=brain", "data.eval_slices"),
        ("data.cohort=huge", "data.cohort"),
        ("model.global_skip=input", "model.global_skip"),
        ("model.conv=fast", "model.conv"),
        ("data.crop_size=1000", "data.crop_size"),
    ],
)
def test_validate_names_the_bad_field(arg, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(build_config("deepsr", arg), num_devices=4)


def test_validate_accepts_the_shipped_configs():
    for model in ("srcnn", "deepsr"):
        for arg in ("scale=8", "scale=12,quick", "scale=16,tiny"):
            validate(build_config(model, arg), num_devices=4 if "tiny" in arg else 1)
