"""Configs as data: the paper protocol, typed `key=value` overrides, and one `validate()`.

A config file (`configs/deepsr.py`) is two lines: `get_config(arg)` returns
`build_config("deepsr", arg)`. The `arg` after the colon in `--config=configs/deepsr.py:scale=8`
is parsed here: comma-separated `key=value` pairs (typed from the default's type, dotted keys
reach nested fields, e.g. `train.lr=3e-4`) and bare flags (`quick`). Unknown keys and flags are
rejected, and the returned config is locked, so `--config.train.lr=3e-4` works on the command line
and a typo fails instead of being silently ignored.

`validate(config)` is the one place that checks a config before any work starts, with errors
that name the field, the value and what was expected.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

# Paper learning rates (Sec. 3.2): SRCNN converges faster with 1e-3; DeepSR's residual
# connections already help convergence, so 1e-4.
PAPER_LR = {"srcnn": 1e-3, "deepsr": 1e-4}

# Flags a config arg may name. Each maps dotted field -> value, applied before `key=value` pairs,
# so `quick,train.epochs=3` and `train.epochs=3,quick` mean the same.
_QUICK = {
    "data.cohort": "small",
    "data.split": "8/2/2",
    "data.crop_size": 64,
    "train.batch_size": 16,
    "train.epochs": 40,
    "train.eval_every_steps": 200,
    "train.checkpoint_every_steps": 200,
    "eval.lpips": False,
}
_TINY = {
    "data.cohort": "tiny",
    "data.split": "2/1/1",
    "data.crop_size": 32,
    "train.batch_size": 4,
    "train.epochs": 1,
    "train.eval_every_steps": 4,
    "train.checkpoint_every_steps": 4,
    "train.log_every_steps": 2,
    "eval.lpips": False,
    "eval.num_figure_slices": 2,
}
# The authors' protocol (their released code): slices min–max scaled to 8 bits, the input made
# by PIL's 8-bit bicubic, batch 16, no augmentation, constant learning rate, final weights.
_PAPER = {
    "data.domain": "paper",
    "data.flip": False,
    "train.batch_size": 16,
    "eval.weights": "final",
}
FLAGS: dict[str, dict[str, dict[str, Any]]] = {
    # A run that finishes on a 2-core CPU in minutes (cohort generation included) and still
    # shows the model clearly above bicubic: the small cohort at 128², random 64² crops, and a
    # DeepSR cut to 6 blocks of 32 features (the deep 20×64 network needs a GPU).
    "quick": {
        "srcnn": _QUICK,
        "deepsr": {**_QUICK, "model.num_blocks": 6, "model.width": 32, "train.lr": 5e-4},
    },
    # The paper's data domain, metrics and training protocol (combine: `quick,paper`).
    "paper": {"srcnn": _PAPER, "deepsr": _PAPER},
    # Unit-test sized: a few steps on the tiny cohort.
    "tiny": {
        "srcnn": _TINY,
        "deepsr": {**_TINY, "model.num_blocks": 2, "model.width": 8},
    },
}


def base_config(model: str) -> ml_collections.ConfigDict:
    """The paper protocol for `model` ("srcnn" or "deepsr")."""
    if model not in PAPER_LR:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(PAPER_LR)}")
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        {
            "name": model,
            # DeepSR only: 20 residual blocks of 64 features (Sec. 3.1.2).
            "num_blocks": 20,
            "width": 64,
            # "feature": long skip at feature level, conv_out(blocks(h) + h) — the authors'
            # released code, the network behind the paper's tables; "image": output = input +
            # net(input), the paper's text.
            "global_skip": "feature",
            # Convolution initialisation: "torch" (PyTorch's default, which the authors' code
            # trained with), "flax" (lecun_normal: 20 blocks explode at init) or "srcnn"
            # (N(0, 0.001²)); see petsr_jax.models.
            "init": "torch",
            # Residual branches scaled by this before they are added (EDSR: 0.1); 1 = the paper.
            "residual_scale": 1.0,
            "remat": False,
            "in_channels": 1,
            # How convolutions are computed, not what: "auto" takes oneDNN on CPUs (or, where it
            # cannot be built, petsr_jax.fast_conv) and flax's nn.Conv elsewhere; or "xla" /
            # "cpu" / "onednn" (see petsr_jax.models.resolve_conv).
            "conv": "auto",
        }
    )
    c.scale = 8  # downscaling factor of the simulated low-resolution input (8, 12, 16, ...)
    c.compute_dtype = "float32"  # "bfloat16" on GPUs; params and optimizer stay float32
    c.seed = 0
    c.data = ml_collections.ConfigDict(
        {
            # A folder of patients (see README "Your own data"); empty = the embedded cohort.
            "root": "",
            # Preset of the embedded cohort used when root is empty: paper | small | tiny.
            "cohort": "paper",
            "cohort_seed": 0,
            # Patients per train/val/test split (paper: 20/4/9 of 33), drawn with split_seed;
            # or an explicit JSON file {"train": [...], "val": [...], "test": [...]}.
            "split": "20/4/9",
            "split_seed": 0,
            "split_file": "",
            # Val/test slices: "mask" (brain slices by the brain mask, else by intensity),
            # "all", or an explicit range "start:stop" of slice indices.
            "eval_slices": "mask",
            # What the network sees: "physical" (each volume / its maximum, float; outputs in
            # physical units) or "paper" (each slice min–max to 8 bits, the input degraded as
            # PIL resizes 8-bit images, scored with the paper's metrics); see data.to_domain.
            "domain": "physical",
            # Training crops (0 = whole slices, as the paper) and flips.
            "crop_size": 0,
            "flip": True,
            # Grain worker processes for the training loader (0 = in the main process).
            "num_workers": 0,
        }
    )
    c.train = ml_collections.ConfigDict(
        {
            "lr": PAPER_LR[model],
            "epochs": 50,
            "batch_size": 8,  # global batch, split over all devices of all processes
            "log_every_steps": 50,
            "eval_every_steps": 0,  # 0 = once per epoch
            "checkpoint_every_steps": 0,  # 0 = once per epoch
            "keep_checkpoints": 3,
        }
    )
    c.eval = ml_collections.ConfigDict(
        {
            "batch_size": 8,
            "lpips": True,
            # Params scored at the end and loaded by default: "best" (best validation PSNR)
            # or "final" (the last step, as the authors did).
            "weights": "best",
            # Folder holding vgg16_weights.h5 and lpips_lin.h5 (else $PETSR_LPIPS_WEIGHTS, the
            # hub cache, or a download where the network allows).
            "lpips_weights": "",
            "num_figure_slices": 4,
        }
    )
    c.distributed = ml_collections.ConfigDict(
        {
            # Initialise jax.distributed: "auto" when a cluster environment (SLURM, ...) is
            # detected or coordinator_address is set; "off"; "on".
            "mode": "auto",
            "coordinator_address": "",
            "num_processes": 0,
            "process_id": -1,
        }
    )
    return c


def parse_value(text: str, default: Any, key: str) -> Any:
    """`text` converted to the type of `default` (the field's type is fixed by its default)."""
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config field {key}: expected true/false, got {text!r}")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ValueError(
            f"config field {key}: expected {type(default).__name__}, got {text!r}"
        ) from None
    return text


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    node = config
    *path, leaf = key.split(".")
    for part in path:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise KeyError(f"unknown config field {key!r}")
        node = node[part]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
        raise KeyError(
            f"unknown config field {key!r}; valid fields: {', '.join(field_names(config))}"
        )
    if isinstance(value, str):
        value = parse_value(value, node[leaf], key)
    node[leaf] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict (e.g. `json.loads(config.to_json())`) as `{"train.lr": 1e-4, ...}`."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# What a trained run does not depend on: logging cadence, loader workers, the cluster set-up,
# evaluation settings (batch size, LPIPS, figures). A workdir started with other values of these
# holds the same run; any other difference makes it another run.
NON_DEFINING_FIELDS = (
    "data.num_workers",
    "distributed.",
    "eval.",
    "train.log_every_steps",
    "train.keep_checkpoints",
)


def config_differences(recorded: dict, config, ignore=NON_DEFINING_FIELDS) -> list[str]:
    """`field: <recorded> in the workdir, <now> now` for every field where the config a workdir
    recorded (its config.json) and `config` differ, leaving out fields starting with `ignore`.

    Splits compare as patient counts ("8,2,2" = "8/2/2"); fields one side lacks show as
    `<absent>` (a config.json from an older version).
    """
    now, before = flatten(json.loads(config.to_json())), flatten(recorded)
    for flat in (now, before):
        if isinstance(flat.get("data.split"), str):
            try:
                flat["data.split"] = parse_split(flat["data.split"])
            except ConfigError:
                pass
    diffs = []
    for key in sorted(set(now) | set(before)):
        if key.startswith(tuple(ignore)) or now.get(key) == before.get(key):
            continue
        was, asked = before.get(key, "<absent>"), now.get(key, "<absent>")
        diffs.append(f"{key}: {was!r} in the workdir, {asked!r} now")
    return diffs


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf names of a config, e.g. `train.lr`."""
    names = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            names += field_names(v, f"{prefix}{k}.")
        else:
            names.append(f"{prefix}{k}")
    return names


def build_config(model: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper config for `model`, with the overrides of a config `arg` applied, locked.

    `arg` is what follows the colon in `--config=configs/deepsr.py:ARG`: comma-separated bare
    flags (see `FLAGS`) and `key=value` pairs, e.g. `"scale=12,quick"` or `"train.lr=3e-4"`.
    A key without a dot that names no top-level field is looked up in the sections
    (`lr` → `train.lr`) when that is unambiguous.
    """
    config = base_config(model)
    flags, pairs = [], []
    for token in (arg or "").split(","):
        token = token.strip()
        if not token:
            continue
        if "=" in token:
            key, value = token.split("=", 1)
            pairs.append((key.strip(), value.strip()))
        elif token in FLAGS:
            flags.append(token)
        else:
            raise ValueError(
                f"unknown config flag {token!r} in {arg!r}; flags: {', '.join(sorted(FLAGS))}; "
                "or give key=value"
            )
    for flag in flags:
        for key, value in FLAGS[flag][model].items():
            _set(config, key, value)
    names = field_names(config)
    for key, value in pairs:
        if key not in names:
            matches = [n for n in names if n.endswith("." + key)]
            if len(matches) != 1:
                hint = f" (did you mean {' or '.join(matches)}?)" if matches else ""
                raise KeyError(f"unknown config field {key!r}{hint}; valid: {', '.join(names)}")
            key = matches[0]
        _set(config, key, value)
    config.lock()
    return config


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and what it expects."""


def parse_split(text: str) -> tuple[int, int, int]:
    """`"20/4/9"` (or `"20,4,9"` in Python code) → (20, 4, 9)."""
    try:
        counts = tuple(int(x) for x in text.replace(",", "/").split("/"))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 0:
        raise ConfigError(f"data.split: expected 'train/val/test' patient counts, got {text!r}")
    return counts  # type: ignore[return-value]


def image_size(config) -> int | None:
    """In-plane size of the embedded cohort preset (None for a user's data root)."""
    if config.data.root:
        return None
    from petsr_jax.cohort import PRESETS

    return PRESETS[config.data.cohort].size


def validate(config, num_devices: int | None = None) -> None:
    """Raise `ConfigError` on anything that would fail later, before any work starts."""
    import jax

    errors = []
    m = config.model
    if m.name not in PAPER_LR:
        errors.append(f"model.name: expected one of {sorted(PAPER_LR)}, got {m.name!r}")
    if m.global_skip not in ("image", "feature"):
        errors.append(f"model.global_skip: expected 'image' or 'feature', got {m.global_skip!r}")
    from petsr_jax.models import INITS

    if m.init not in INITS:
        errors.append(f"model.init: expected one of {', '.join(INITS)}, got {m.init!r}")
    if not m.residual_scale > 0:
        errors.append(f"model.residual_scale: expected a positive factor, got {m.residual_scale}")
    if m.conv not in ("auto", "xla", "cpu", "onednn"):
        errors.append(f"model.conv: expected auto, xla, cpu or onednn, got {m.conv!r}")
    if m.num_blocks < 0 or m.width < 1 or m.in_channels < 1:
        errors.append("model.num_blocks must be ≥ 0, model.width and model.in_channels ≥ 1")
    if config.compute_dtype not in ("float32", "bfloat16", "float16"):
        errors.append(
            f"compute_dtype: expected float32|bfloat16|float16, got {config.compute_dtype!r}"
        )
    if not isinstance(config.scale, int) or config.scale < 2:
        errors.append(
            f"scale: expected an integer ≥ 2 (the paper uses 8, 12, 16), got {config.scale!r}"
        )
    size = None
    if config.data.root:
        if not os.path.isdir(config.data.root):
            errors.append(f"data.root: {config.data.root!r} is not a folder")
    else:
        from petsr_jax.cohort import PRESETS

        if config.data.cohort not in PRESETS:
            errors.append(
                f"data.cohort: expected one of {sorted(PRESETS)}, got {config.data.cohort!r}"
            )
        else:
            size = PRESETS[config.data.cohort].size
    crop = config.data.crop_size
    if crop < 0:
        errors.append(f"data.crop_size: expected 0 (whole slices) or a positive size, got {crop}")
    side = crop or size
    if side and isinstance(config.scale, int) and config.scale >= 2 and side // config.scale < 2:
        errors.append(
            f"scale: {config.scale}× leaves fewer than 2 low-resolution pixels of a {side}-pixel "
            f"{'crop' if crop else 'slice'}; use a smaller scale or a larger data.crop_size"
        )
    if crop and size and crop > size:
        errors.append(f"data.crop_size: {crop} is larger than the {size}-pixel slices")
    try:
        parse_split(config.data.split)
    except ConfigError as e:
        errors.append(str(e))
    if config.data.split_file and not os.path.isfile(config.data.split_file):
        errors.append(f"data.split_file: {config.data.split_file!r} does not exist")
    if config.data.domain not in ("physical", "paper"):
        errors.append(f"data.domain: expected physical or paper, got {config.data.domain!r}")
    if config.eval.weights not in ("best", "final"):
        errors.append(f"eval.weights: expected best or final, got {config.eval.weights!r}")
    es = config.data.eval_slices
    if es not in ("mask", "all") and not _is_range(es):
        errors.append(f"data.eval_slices: expected 'mask', 'all' or 'start:stop', got {es!r}")
    t = config.train
    if t.lr <= 0 or t.epochs < 1 or t.batch_size < 1:
        errors.append("train.lr must be > 0, train.epochs and train.batch_size ≥ 1")
    n = num_devices if num_devices is not None else jax.device_count()
    if t.batch_size % n:
        errors.append(
            f"train.batch_size: the global batch {t.batch_size} is not divisible by the {n} "
            f"devices; use a multiple of {n}"
        )
    if config.eval.batch_size < 1:
        errors.append("eval.batch_size must be ≥ 1")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def _is_range(text: str) -> bool:
    parts = text.split(":")
    return len(parts) == 2 and all(p.strip().isdigit() for p in parts)
