"""Config files, the `key=value,flag` parser, the launch scripts' flag check, and `validate`."""

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from petsr_jax import config as config_lib
from petsr_jax.config import (
    CONFIGS_DIR,
    FLAGS,
    ConfigError,
    base_config,
    build_config,
    config_flag_problem,
    flatten,
    validate,
)

REPO = Path(__file__).resolve().parent.parent

# Every field of the configs that `build_config(model, arg)` gave for these args before the
# protocols moved into configs/*.py: the README's, the launch scripts', reproduce's, the
# benchmark's and the tests' args. Stored as each model's no-arg config plus, per arg, the fields
# that differ from it.
BEFORE = json.loads((Path(__file__).parent / "data" / "config_values.json").read_text())
ARGS_BEFORE = [(model, arg) for model, args in BEFORE["overrides"].items() for arg in ["", *args]]


def fields(config) -> dict:
    return flatten(json.loads(config.to_json()))


@pytest.mark.parametrize("model,arg", ARGS_BEFORE)
def test_config_files_give_the_values_of_before(model, arg):
    expected = {**BEFORE["defaults"][model], **BEFORE["overrides"][model].get(arg, {})}
    got = fields(build_config(model, arg))
    assert set(got) == set(fields(base_config(model)))
    # Every field both versions have keeps its value and type; a field added to or dropped
    # from `base_config` since then is the schema's change, not a config file's.
    shared = set(got) & set(expected)
    assert {k: got[k] for k in shared} == {k: expected[k] for k in shared}
    assert {k: type(got[k]) for k in shared} == {k: type(expected[k]) for k in shared}


# The paper protocol (Sec. 3): what `configs/<model>.py` without variants trains, and what
# `petsr_jax.load` gives a field a recorded config.json lacks. Written out here rather than read
# from `base_config`, so that whoever changes the protocol changes this test too.
PROTOCOL = {
    "scale": 8,
    "compute_dtype": "float32",
    "seed": 0,
    "model.num_blocks": 20,
    "model.width": 64,
    "model.global_skip": "feature",
    "model.init": "torch",
    "model.residual_scale": 1.0,
    "model.in_channels": 1,
    "train.epochs": 50,
    "train.batch_size": 8,
    "train.eval_every_steps": 0,
    "train.checkpoint_every_steps": 0,
    "data.root": "",
    "data.cohort": "paper",
    "data.split": "20/4/9",
    "data.crop_size": 0,
    "data.flip": True,
    "data.domain": "physical",
    "data.eval_slices": "mask",
    "task.degradation": "bicubic",
    "task.context": 0,
    "task.consistency": "none",
    "mr.t1": False,
    "eval.weights": "best",
    "eval.lpips": True,
    "eval.num_figure_slices": 4,
}


@pytest.mark.parametrize("model,lr", [("deepsr", 1e-4), ("srcnn", 1e-3)])
def test_paper_protocol_is_the_default(model, lr):
    for config in (build_config(model, ""), build_config(model), base_config(model)):
        got = fields(config)
        assert {k: got[k] for k in PROTOCOL} == PROTOCOL
        assert got["train.lr"] == lr and got["model.name"] == model
    # The split is the paper's 33 patients: 20 train, 4 validation, 9 test.
    assert config_lib.parse_split(build_config(model).data.split) == (20, 4, 9)


def test_config_imports_nothing_of_the_package_but_the_cohort_sizes():
    """The config is the bottom of the package (models, data, task and training import it): an
    import of any of them from config.py would be a circle. `validate` alone reads the embedded
    cohort's slice sizes from petsr_jax.sim, which imports no config."""
    tree = ast.parse(Path(config_lib.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert {name for name in imported if name.startswith("petsr_jax")} == {"petsr_jax.sim"}


@pytest.mark.parametrize("model", config_lib.MODELS)
def test_every_config_file_offers_the_flags_and_its_run_commands(model):
    assert (
        f"python launch/main.py --config=configs/{model}.py:"
        in (CONFIGS_DIR / f"{model}.py").read_text()
    )
    protocol = fields(build_config(model))
    for flag in FLAGS:
        assert fields(build_config(model, flag)) != protocol, flag
    with pytest.raises(ConfigError, match=f"flags: {', '.join(FLAGS)}, and fields take"):
        build_config(model, "gpux")


@pytest.mark.parametrize("model", config_lib.MODELS)
def test_gpu_and_quick_variants_override_a_few_fields(model):
    protocol = fields(build_config(model, "scale=8"))

    def changed(arg):
        return {k: v for k, v in fields(build_config(model, arg)).items() if v != protocol[k]}

    gpu = changed("scale=8,gpu")
    assert gpu["compute_dtype"] == "bfloat16" and len(gpu) <= 4
    assert build_config(model, "gpu").data.crop_size == 0  # whole slices
    assert build_config(model, "quick,gpu").data.crop_size == 0  # variants apply in order
    quick = changed("scale=8,quick")
    assert quick["data.cohort"] == "small" and len(quick) <= 11
    validate(build_config(model, "scale=8,gpu"), num_devices=1)


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
        ("scael=8", "unknown config field 'scael'; nearest: scale"),
        ("lrr=3e-4", "unknown config field 'lrr'; nearest: train.lr"),
        ("train.lrr=3e-4", "unknown config field 'train.lrr'; nearest: train.lr"),
        ("quik", "unknown config flag 'quik'; nearest: quick; flags: gpu, mr, paper, quick, scan"),
        ("fast", "unknown config flag 'fast'; flags: gpu, mr, paper, quick, scanner, tiny"),
        ("batch_size=4", "ambiguous; give eval.batch_size or train.batch_size"),
        ("scale=eight", "expected int"),
        ("flip=maybe", "expected true/false"),
    ],
)
def test_bad_args_are_rejected_with_the_reason(arg, message):
    with pytest.raises(ConfigError) as error:
        build_config("deepsr", arg)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_config_is_locked_against_typos():
    c = build_config("srcnn")
    c.train.lr = 3e-4  # existing field: fine (what --config.train.lr does)
    with pytest.raises(AttributeError):
        c.train.lrr = 1.0


def test_config_serialises_to_json():
    c = build_config("deepsr", "quick")
    assert json.loads(c.to_json())["model"]["num_blocks"] == 6


@pytest.mark.filterwarnings("ignore:the load_module")  # ml_collections' own loader
def test_command_line_overrides_reach_the_locked_config():
    argv = [
        "main.py",
        f"--config={CONFIGS_DIR / 'deepsr.py'}:scale=8,quick",
        "--config.train.lr=3e-4",
    ]
    flag_values = flags.FlagValues()
    handle = config_flags.DEFINE_config_file(
        "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    assert handle.value.train.lr == 3e-4 and handle.value.model.num_blocks == 6
    with pytest.raises(AttributeError):
        handle.value.train.lrr = 1.0


def test_library_needs_no_config_files_except_to_build_from_them(monkeypatch, tmp_path):
    monkeypatch.setattr(config_lib, "CONFIGS_DIR", tmp_path / "configs")
    assert base_config("deepsr").train.lr == 1e-4
    with pytest.raises(ConfigError, match="deepsr.py: no such config file"):
        build_config("deepsr", "scale=8")


@pytest.mark.parametrize(
    "args,problem",
    [
        (
            ["--config=configs/deepsr.py:scale=8", "--config.train.lrr=3e-4"],
            "--config.train.lrr: unknown config field 'train.lrr'; nearest: train.lr",
        ),
        (
            ["--config=configs/deepsr.py:lrr=3e-4"],
            "--config=configs/deepsr.py:lrr=3e-4: unknown config field 'lrr'; nearest: train.lr",
        ),
        (["--config", "configs/srcnn.py:quik"], "unknown config flag 'quik'; nearest: quick"),
        (["--config=configs/deepsr.py", "--config.lr=1e-3"], "'lr'; nearest: train.lr"),
        (["--config=configs/deepsr.py", "--config.train.lr=abc"], "expected float, got 'abc'"),
        (["--config=configs/deepsr.pyy"], "no such config file; config files there: deepsr.py"),
    ],
)
def test_flag_check_names_the_bad_key_and_the_nearest(monkeypatch, args, problem):
    monkeypatch.chdir(REPO)
    found = config_flag_problem(["main.py", *args, "--workdir=/tmp/x"])
    assert found is not None and problem in found and "\n" not in found


def test_flag_check_passes_the_commands_of_the_docs(monkeypatch):
    monkeypatch.chdir(REPO)
    for args in (
        ["--config=configs/deepsr.py:scale=8,quick,paper", "--config.train.lr=3e-4"],
        ["--config=configs/deepsr.py:scale=8", "--config.data.root=/data/my_pet"],
        ["--config=configs/deepsr.py:scale=8,data.root=/data/my_pet,data.split=14/3/5"],
        ["--config=configs/deepsr.py:scale=12", "--config.model.global_skip=image"],
        ["--config=configs/srcnn.py:scale=8,gpu", "--config.distributed.process_id=0"],
        ["--config=configs/deepsr.py:scale=8,quick", "--config.train.epochs", "5"],
        ["--config=configs/deepsr.py:scale=8", "--noconfig.data.flip"],
        ["--sweep=depth", "--values=2,4"],  # no config: absl's own checks apply
    ):
        assert config_flag_problem(["main.py", *args]) is None, args


@pytest.mark.parametrize(
    "script,args,bad,nearest",
    [
        ("main.py", ["--config=configs/deepsr.py:scale=8,tiny", "--config.train.lrr=3e-4"],
         "'train.lrr'", "train.lr"),
        ("ablate.py", ["--config=configs/deepsr.py:scale=8,quik", "--sweep=depth", "--values=2"],
         "'quik'", "quick"),
    ],
)  # fmt: skip
def test_launch_scripts_end_a_config_typo_with_one_line(tmp_path, script, args, bad, nearest):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = {**os.environ, "PETSR_DATA_DIR": str(data_dir)}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, f"launch/{script}", *args, f"--workdir={tmp_path / 'run'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert bad in lines[0] and f"nearest: {nearest}" in lines[0]
    # Before any data or JAX work: no cohort, no workdir, and the time of the imports alone.
    assert not any(data_dir.iterdir()) and not (tmp_path / "run").exists()
    assert elapsed < 60, elapsed


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
        for arg in ("scale=8", "scale=12,quick", "scale=16,tiny", "scale=8,gpu", "quick,paper"):
            validate(build_config(model, arg), num_devices=4 if "tiny" in arg else 1)
