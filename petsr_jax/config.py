"""Configs as data: the fields every config has, the `key=value,flag` parser, and `validate()`.

The paper protocol is written once, here, as the defaults of `base_config`; the config files,
`configs/srcnn.py` and `configs/deepsr.py`, take it as it is and add a few named variants
(`quick`, `tiny`, `paper`, `gpu`, `mr`, `scanner`) that change a few fields. What every config
shares lives here, so that the library works from a notebook without the `configs/` folder:

- `base_config(model)`: every field a run reads, with its type, its meaning and the paper
  protocol's value. `petsr_jax.load` fills a workdir's config.json with it, so a run recorded
  before a field existed loads as its config file gives it.
- `apply_arg(config, arg, variants)`: the text after the colon in
  `--config=configs/deepsr.py:scale=8,quick`. Bare flags name variants and apply first, in the
  order given; `key=value` pairs are typed like the field (`scale=12`, `train.lr=3e-4`, or the
  unambiguous short key `lr=3e-4`). Unknown keys and flags fail naming the nearest valid ones,
  and the result is locked, so `--config.train.lr=3e-4` works and `--config.train.lrr` fails.
- `build_config(model, arg)`: what `--config=configs/<model>.py:<arg>` gives, for code and tests.
- `parse_flags(argv)`: the launch scripts' flag parser; a bad `--config` ends with one line on
  stderr and exit status 2 before any data or JAX work, instead of a traceback.
- `validate(config)`: the one check before any work starts, with errors that name the field,
  the value and what was expected.
- `input_channels(config)`: how many channels the network input has, a function of the fields
  alone.

This module is the bottom of the package: it imports nothing else of it (only `validate` looks
up the embedded cohort's slice sizes in `petsr_jax.sim`), so models, data, the task and training
all import it without a circle. The names each field may take (`MODELS`, `INITS`, `CONVS`,
`DEGRADATIONS`, `CONSISTENCY`) are therefore defined here and imported by the modules that
implement them.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import ml_collections

MODELS = ("srcnn", "deepsr")
# `model.init`: PyTorch's default (the authors'), flax's lecun_normal, SRCNN's N(0, 0.001²);
# petsr_jax.models.layers implements them.
INITS = ("torch", "flax", "srcnn")
# `model.conv`: how convolutions are computed (petsr_jax.models.conv_module). Older config.json
# files say "xla" for "flax"; `petsr_jax.inference.read_config` reads it as "flax".
CONVS = ("auto", "flax", "cpu", "onednn")
# `task.degradation` and `task.consistency` (petsr_jax.task).
DEGRADATIONS = ("bicubic", "scanner")
CONSISTENCY = ("none", "block")

# The bare flags every config file offers, each a variant defined in the file's `VARIANTS`:
# `quick` (a 2-core CPU, minutes), `tiny` (unit tests), `paper` (the authors' data domain and
# training), `gpu` (one GPU, bfloat16) and `mr` (the co-registered T1 as a second input channel).
FLAGS = ("gpu", "mr", "paper", "quick", "scanner", "tiny")

# What each flag is for, in one line: the launch scripts' `--help` lists the variants the config
# files define (their `VARIANTS`, the fields each sets) with these lines beside them.
FLAG_HELP = {
    "quick": "a 2-core CPU run of minutes: small cohort, 64² crops, 40 epochs, DeepSR 6×32",
    "gpu": "one GPU: bfloat16 compute, whole 384² slices, batch 16",
    "paper": "the authors' protocol: 8-bit data domain, batch 16, no flips, final weights",
    "mr": "MR-guided: the co-registered T1 as a second input channel, anchored to a PET-only "
    "network per 4×4 block",
    "scanner": "train on what scanners produce: 3D PSF + noise of random shape phantoms, "
    "7 slices in, activity kept per block (for enhancing real scans)",
    "tiny": "the tests' size: the tiny cohort (4 × 8 slices of 32²), a few steps",
}

# The `mr` variant, the same for both networks: the co-registered T1 slice as a second input
# channel (full resolution, not degraded); the output and DeepSR's residual stay PET only. The
# guided network is anchored (`mr.anchor_block`): a PET-only network is trained beside it and
# the guided output keeps the PET-only output's activity in every 4×4 block, so the T1 sharpens
# within a block but does not fill a lesion the PET does not show (the plain guided network,
# `mr,mr.anchor_block=0`, does: README, MR-guided super-resolution). Combines with the others:
# `quick,mr`. Add the radial and axial coordinate channels with `mr.coordinates=true,
# model.in_channels=4`.
MR_VARIANT = {"mr.t1": True, "model.in_channels": 2, "mr.anchor_block": 4}

# The `scanner` variant, the same for both networks: trained on what a scanner produces, for
# enhancing real scans (petsr_jax.task). The input is the true activity of random shape phantoms
# blurred by a 3D PSF of 3–6 mm FWHM with reconstruction noise, the target the same activity at
# 0.4× that FWHM without noise; the network sees 7 slices (the PSF is 3D: with 3 the NEMA
# phantom's 10 mm sphere stayed at 0.77× its FWHM, with 7 it reaches 0.70×) and is told the PSF;
# its output keeps the input's activity in every 4×4 block. Combines with the others:
# `scanner,quick` (a CPU run of minutes), `scanner,gpu`.
SCANNER_VARIANT = {
    "task.degradation": "scanner",
    "task.context": 3,
    "task.consistency": "block",
    "model.in_channels": 8,
    "data.eval_slices": "all",
}

# Where `build_config` finds the config files: the `configs/` folder of a source checkout.
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and what it expects."""


def base_config(model: str) -> ml_collections.ConfigDict:
    """Every field of a `model` ("srcnn" or "deepsr") config, with its meaning; unlocked.

    The values are the paper protocol's: `configs/<model>.py` without variants is exactly this,
    and a workdir's config.json that lacks a field (a run recorded before the field existed)
    takes it from here. They also fix each field's type: `scale=12` parses as an int because
    `scale` is 8 here.
    """
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        {
            "name": model,
            # SRCNN (Sec. 3.1.1) is three convolutions, 9×9/64 → 1×1/32 → 5×5/1, and has no
            # field of its own. DeepSR (Sec. 3.1.2): 20 residual blocks (conv–ReLU–conv plus
            # identity) of 64 features between a 3×3 input and output convolution; these
            # DeepSR fields (to residual_scale) are unused by SRCNN.
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
            # Input channels: the PET slices plus the guidance channels `task` and `mr` ask
            # for (`input_channels` below); validate() checks the two agree.
            "in_channels": 1,
            # How convolutions are computed, not what: "auto" takes flax's nn.Conv, or on one
            # CPU device petsr_jax.cpu's kernels; or "flax" / "cpu" / "onednn" (see
            # petsr_jax.cpu.resolve_conv).
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
            # Preset of the embedded cohort used when root is empty: paper (33 patients × 89
            # slices of 384², the paper's size) | small | tiny.
            "cohort": "paper",
            "cohort_seed": 0,
            # Patients per train/val/test split (paper: 20/4/9 of 33), drawn with split_seed;
            # or an explicit JSON file {"train": [...], "val": [...], "test": [...]}.
            "split": "20/4/9",
            "split_seed": 0,
            "split_file": "",
            # Val/test slices: "mask" (the brain slices by the brain mask, else by intensity;
            # training uses every slice),
            # "all", or an explicit range "start:stop" of slice indices.
            "eval_slices": "mask",
            # What the network sees: "physical" (each volume / its maximum, float; outputs in
            # physical units) or "paper" (each slice min–max to 8 bits, the input degraded as
            # PIL resizes 8-bit images, scored with the paper's metrics); see data.to_domain.
            "domain": "physical",
            # Training crops (0 = whole slices, as the paper) and random flips.
            "crop_size": 0,
            "flip": True,
            # Grain worker processes for the training loader (0 = in the main process).
            "num_workers": 0,
        }
    )
    # MR guidance (Song et al. 2020), off in the paper protocol: the co-registered T1
    # (<root>/t1/<patient>.nii.gz, full resolution, never degraded) and optionally the radial and
    # axial position of each pixel enter the network beside the degraded PET; the output and the
    # global residual stay PET only. See petsr_jax.data.mr.
    c.mr = ml_collections.ConfigDict(
        {
            "t1": False,
            # Two more channels: distance from the slice centre and position along the axis.
            "coordinates": False,
            # Fraction of training images whose guidance channels are zeroed: the network must
            # also restore the PET without the anatomy, so it cannot learn that the T1 alone
            # decides the uptake (a lesion exists in the PET only). Evaluation and use always
            # give the T1.
            "dropout": 0.0,
            # Block side in pixels (0 = off): a PET-only network is trained beside the guided
            # one, and the guided output keeps the PET-only output's activity in every block of
            # this side, so the T1 can sharpen within a block but not fill a lesion the PET
            # does not show (petsr_jax.models.anchored).
            "anchor_block": 0,
            # The anchor's block grid at every offset, averaged: total activity kept, without the
            # blocks' edges drawn into the output (task.conserve_activity_unblocked). Measured
            # at 8×: the network then moves lesion activity as the unanchored one does (README).
            "anchor_unblocked": False,
        }
    )
    # What the network learns to undo, and what its output must keep (petsr_jax.task).
    c.task = ml_collections.ConfigDict(
        {
            # "bicubic": the paper's bicubic ↓↑ ×scale; "scanner": a clinical reconstruction's
            # 3D PSF and noise (the `scanner` fields), the target a finer noise-free image.
            "degradation": "bicubic",
            # Neighbouring slices each side fed as input channels (2.5D); 0 = one slice (2D).
            "context": 0,
            # "block": the output made non-negative and rescaled so each block of pixels holds
            # the input's activity (super-resolution moves activity, never creates it);
            # "none": the network's output as it is (the paper's).
            "consistency": "none",
            # Block side in pixels; 0 = the scale (bicubic) or scanner.block (scanner).
            "consistency_block": 0,
        }
    )
    # The scanner degradation (task.degradation="scanner"): per training slice a PSF FWHM and
    # a noise level drawn from these ranges; the target is blurred by target_ratio × the PSF.
    c.scanner = ml_collections.ConfigDict(
        {
            "fwhm_min_mm": 3.0,  # clinical PET: 3 (digital, PSF-OSEM) to 6 mm (older, FBP)
            "fwhm_max_mm": 6.0,
            "target_ratio": 0.4,
            # Voxel CoV of a uniform background at the slice's mean activity level.
            "noise_min": 0.02,
            "noise_max": 0.4,
            "noise_fwhm_px": 1.5,  # OSEM noise is correlated over a few pixels
            # What enhancement assumes when a scan's FWHM is not given (--psf_fwhm_mm).
            "nominal_fwhm_mm": 4.5,
            "block": 4,  # the activity-consistency block of a scanner task, in pixels
            # Training data when data.root is empty: "phantoms" (random shape phantoms,
            # petsr_jax.sim.phantoms) or "cohort" (the data.cohort preset's scans).
            "data": "phantoms",
            "phantoms": 20,  # how many (train/val/test 16/2/2 of 20)
        }
    )
    # Training (Sec. 3.2): MSE loss and Adam, at 1e-3 for SRCNN (faster convergence) and 1e-4 for
    # DeepSR (its residual connections already speed convergence up), both 50 epochs for a fair
    # comparison; validation and a checkpoint once per epoch.
    c.train = ml_collections.ConfigDict(
        {
            "lr": {"srcnn": 1e-3, "deepsr": 1e-4}[model],
            "epochs": 50,
            "batch_size": 8,  # global batch, split over all devices of all processes
            "log_every_steps": 50,
            "eval_every_steps": 0,  # 0 = once per epoch
            "checkpoint_every_steps": 0,  # 0 = once per epoch
            "keep_checkpoints": 3,
            # Extra weight of lesion voxels in the MSE (w = 1 + lesion_weight inside a lesion of
            # <root>/lesions/, the loss mean(w·err²) / mean(w)); 0 = the paper's plain MSE.
            # Lesions exist in the PET only: weighing them makes a network that is told the
            # anatomy pay for filling them with the uptake the anatomy predicts.
            "lesion_weight": 0.0,
        }
    )
    # Evaluation: PSNR, SSIM and LPIPS of the params with the best validation PSNR, beside the
    # bicubic baseline.
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
        raise ConfigError(f"config field {key}: expected true/false, got {text!r}")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ConfigError(
            f"config field {key}: expected {type(default).__name__}, got {text!r}"
        ) from None
    return text


def nearest(name: str, valid: list[str], n: int = 3) -> list[str]:
    """The entries of `valid` closest to a misspelt `name`, compared whole and by their last
    dotted part, so that `lrr` and `train.lrr` both find `train.lr`."""
    by_leaf: dict[str, list[str]] = {}
    for entry in valid:
        by_leaf.setdefault(entry.rsplit(".", 1)[-1], []).append(entry)
    close = difflib.get_close_matches(name, valid, n=n)
    for leaf in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(by_leaf), n=n):
        close += by_leaf[leaf]
    return list(dict.fromkeys(close))[:n]


def unknown(what: str, name: str, valid: list[str]) -> str:
    """`unknown <what> '<name>'; nearest: ...`, or every valid name when none is close."""
    close = nearest(name, valid)
    if close:
        return f"unknown {what} {name!r}; nearest: {', '.join(close)}"
    return f"unknown {what} {name!r}; valid: {', '.join(valid)}"


def resolve_key(config: ml_collections.ConfigDict, key: str) -> str:
    """The dotted field a key names: itself, or the one field it ends (`lr` → `train.lr`)."""
    names = field_names(config)
    if key in names:
        return key
    matches = [name for name in names if name.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"config field {key!r} is ambiguous; give {' or '.join(matches)}")
    raise ConfigError(unknown("config field", key, names))


def get_field(config: ml_collections.ConfigDict, key: str) -> Any:
    """The value of the dotted field `key`, e.g. `get_field(config, "train.lr")`."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def set_field(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Set the field `key` names (see `resolve_key`); a string is parsed to the field's type."""
    *path, leaf = resolve_key(config, key).split(".")
    node = get_field(config, ".".join(path)) if path else config
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


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf names of a config, e.g. `train.lr`."""
    names = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            names += field_names(v, f"{prefix}{k}.")
        else:
            names.append(f"{prefix}{k}")
    return names


def apply_arg(
    config: ml_collections.ConfigDict, arg: str | None, variants: dict[str, dict[str, Any]]
) -> ml_collections.ConfigDict:
    """`config` with the flags and `key=value` pairs of a config `arg` applied, then locked.

    `arg` is what follows the colon in `--config=configs/deepsr.py:ARG`, e.g. `"scale=12,quick"`.
    A flag names a variant (`variants[flag]`: dotted field → value); variants apply before the
    pairs, in the order given, so `quick,train.epochs=3` and `train.epochs=3,quick` both train
    3 epochs on top of the quick variant.
    """
    flags, pairs = [], []
    for token in (arg or "").split(","):
        token = token.strip()
        if "=" in token:
            key, value = token.split("=", 1)
            pairs.append((key.strip(), value.strip()))
        elif token in variants:
            flags.append(token)
        elif token:
            close = nearest(token, list(variants))
            raise ConfigError(
                f"unknown config flag {token!r}; "
                + (f"nearest: {', '.join(close)}; " if close else "")
                + f"flags: {', '.join(sorted(variants))}, and fields take key=value"
            )
    for flag in flags:
        for key, value in variants[flag].items():
            set_field(config, key, value)
    for key, value in pairs:
        set_field(config, key, value)
    config.lock()
    return config


def build_config(model: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """What `--config=configs/<model>.py:<arg>` gives: that config file's `get_config(arg)`.

    The config files belong to the source checkout, not to the installed package; a trained run
    loads without them (`petsr_jax.load` rebuilds its config from the workdir's config.json).
    """
    return load_config_file(CONFIGS_DIR / f"{model}.py", arg)


def load_config_file(path, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path`, as `--config=<path>:<arg>` loads it."""
    path = Path(path)
    if not path.is_file():
        files = sorted(p.name for p in path.parent.glob("*.py")) if path.parent.is_dir() else []
        hint = f"; config files there: {', '.join(files)}" if files else ""
        raise ConfigError(f"{path}: no such config file{hint}")
    return _config_module(path).get_config(arg)


def _config_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"petsr_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variants(model: str) -> dict[str, dict[str, Any]]:
    """The variants `configs/<model>.py` offers after the colon: its `VARIANTS`, each flag with
    the fields it sets; empty where the config files are not there (an installed package)."""
    path = CONFIGS_DIR / f"{model}.py"
    if not path.is_file():
        return {}
    return dict(getattr(_config_module(path), "VARIANTS", {}))


def config_flag_problem(argv: list[str], flag: str = "config") -> str | None:
    """What is wrong with the `--<flag>=<file>:<arg>` and `--<flag>.<field>=<value>` arguments
    in `argv`, in one line; None when nothing is, or when `argv` names no config file."""
    spec, overrides = None, []
    tokens = iter(argv[1:])
    for token in tokens:
        if token == "--":
            break
        if not token.startswith("-"):
            continue
        name, has_value, value = token.lstrip("-").partition("=")
        if name == flag:
            spec = value if has_value else next(tokens, "")
        elif name.startswith((f"{flag}.", f"no{flag}.")):
            overrides.append((name.split(".", 1)[1], value if has_value else None))
    if spec is None:
        return None
    path, _, arg = spec.partition(":")
    try:
        config = load_config_file(path, arg)
    except ConfigError as error:
        return f"--{flag}={spec}: {error}"
    names = field_names(config)
    for key, value in overrides:
        if key not in names:
            return f"--{flag}.{key}: {unknown('config field', key, names)}"
        current = get_field(config, key)
        if value is not None and not isinstance(current, bool):  # absl parses booleans itself
            try:
                parse_value(value, current, key)
            except ConfigError as error:
                return f"--{flag}.{key}={value}: {error}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for a launch script: `app.run(main, flags_parser=parse_flags)`.

    ml_collections reports a misspelt config key (`--config.train.lrr=3e-4`, `:lrr=3e-4`, the
    flag `:quik`) with a traceback from its own internals. Here the config file, its arg and
    every `--config.<field>` override are checked first, before any data or JAX work, and a
    problem ends the process with one line on stderr naming the bad key and the nearest valid
    ones, exit status 2 (the launch scripts' status for a bad input). The rest is absl's.
    """
    from absl import app

    problem = config_flag_problem(argv)
    if problem:
        print(f"{os.path.basename(argv[0])}: error: {problem}", file=sys.stderr)
        sys.exit(2)
    return app.parse_flags_with_usage(argv)


def parse_split(text: str) -> tuple[int, int, int]:
    """`"20/4/9"` (or `"20,4,9"` in Python code) → (20, 4, 9)."""
    try:
        counts = tuple(int(x) for x in text.replace(",", "/").split("/"))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 0:
        raise ConfigError(f"data.split: expected 'train/val/test' patient counts, got {text!r}")
    return counts  # type: ignore[return-value]


def validate(config, num_devices: int | None = None) -> None:
    """Raise `ConfigError` on anything that would fail later, before any work starts."""
    import jax

    errors = []
    m = config.model
    if m.name not in MODELS:
        errors.append(f"model.name: expected one of {', '.join(MODELS)}, got {m.name!r}")
    if m.global_skip not in ("image", "feature"):
        errors.append(f"model.global_skip: expected 'image' or 'feature', got {m.global_skip!r}")
    if m.init not in INITS:
        errors.append(f"model.init: expected one of {', '.join(INITS)}, got {m.init!r}")
    if not m.residual_scale > 0:
        errors.append(f"model.residual_scale: expected a positive factor, got {m.residual_scale}")
    if m.conv not in CONVS:
        errors.append(f"model.conv: expected one of {', '.join(CONVS)}, got {m.conv!r}")
    if m.num_blocks < 0 or m.width < 1 or m.in_channels < 1:
        errors.append("model.num_blocks must be ≥ 0, model.width and model.in_channels ≥ 1")
    errors += _mr_problems(config)
    errors += _task_problems(config)
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
        from petsr_jax.sim import PRESETS

        if config.task.degradation == "scanner" and config.scanner.data == "phantoms":
            from petsr_jax.sim import phantoms

            size = phantoms.SIZE
        elif config.data.cohort not in PRESETS:
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
    if t.get("lesion_weight", 0.0) < 0:
        errors.append(f"train.lesion_weight: expected ≥ 0, got {t.lesion_weight}")
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


def _task_problems(config) -> list[str]:
    """The task fields: a degradation, context or consistency the data domain cannot carry,
    and scanner ranges that cannot be drawn from."""
    t, s, problems = config.task, config.scanner, []
    if t.degradation not in DEGRADATIONS:
        problems.append(f"task.degradation: expected one of {DEGRADATIONS}, got {t.degradation!r}")
    if t.consistency not in CONSISTENCY:
        problems.append(f"task.consistency: expected one of {CONSISTENCY}, got {t.consistency!r}")
    if t.context < 0 or t.consistency_block < 0:
        problems.append("task.context and task.consistency_block must be ≥ 0")
    if config.data.domain == "paper" and (
        t.degradation != "bicubic" or t.context or t.consistency != "none"
    ):
        problems.append(
            "data.domain=paper is the authors' 2D bicubic protocol on 8-bit slices: it takes "
            "task.degradation=bicubic, task.context=0 and task.consistency=none (activity is not "
            "defined on min–max scaled slices); use data.domain=physical"
        )
    if t.degradation == "scanner":
        if not 0 < s.fwhm_min_mm <= s.fwhm_max_mm:
            problems.append("scanner.fwhm_min_mm must be > 0 and ≤ scanner.fwhm_max_mm")
        if not 0 <= s.noise_min <= s.noise_max:
            problems.append("scanner.noise_min must be ≥ 0 and ≤ scanner.noise_max")
        if not 0 < s.target_ratio < 1:
            problems.append(
                f"scanner.target_ratio: the target's PSF is this fraction of the input's; "
                f"expected between 0 and 1, got {s.target_ratio}"
            )
        if s.data not in ("phantoms", "cohort"):
            problems.append(f"scanner.data: expected phantoms or cohort, got {s.data!r}")
        if s.phantoms < 3:
            problems.append(
                f"scanner.phantoms: train, val and test need 3 or more, got {s.phantoms}"
            )
        if s.block < 1 or s.noise_fwhm_px < 0 or s.nominal_fwhm_mm <= 0:
            problems.append(
                "scanner.block must be ≥ 1, scanner.noise_fwhm_px ≥ 0, nominal_fwhm_mm > 0"
            )
    return problems


def _mr_problems(config) -> list[str]:
    """The MR guidance fields against the network's input channels: a mismatch would only
    surface as a shape error deep inside the first train step."""
    problems = []
    if config.mr.coordinates and not config.mr.t1:
        problems.append("mr.coordinates: the coordinate channels come with the T1; set mr.t1=true")
    dropout = config.mr.get("dropout", 0.0)
    if not 0.0 <= dropout < 1.0:
        problems.append(f"mr.dropout: a fraction of training images, in [0, 1); got {dropout}")
    elif dropout and not config.mr.t1:
        problems.append("mr.dropout: drops the T1 guidance of an MR-guided run; set mr.t1=true")
    anchor = config.mr.get("anchor_block", 0)
    if anchor < 0:
        problems.append(f"mr.anchor_block: a block side in pixels, or 0; got {anchor}")
    elif anchor and not config.mr.t1:
        problems.append("mr.anchor_block: anchors an MR-guided network; set mr.t1=true")
    if config.mr.get("anchor_unblocked", False) and not anchor:
        problems.append(
            "mr.anchor_unblocked: averages the anchor's block grid; set mr.anchor_block"
        )
    expected = input_channels(config)
    if config.model.in_channels != expected:
        problems.append(
            f"model.in_channels: {config.model.in_channels}, but task.context="
            f"{config.task.context}, task.degradation={config.task.degradation}, mr.t1="
            f"{config.mr.t1} and mr.coordinates={config.mr.coordinates} feed {expected} channels "
            f"(PET slices, T1, radial, axial, FWHM as set); set model.in_channels={expected}"
        )
    return problems


def guidance_channels(config) -> tuple[str, ...]:
    """Names of the MR guidance channels a config feeds the network, in channel order
    (`petsr_jax.data.mr` makes them)."""
    mr = config.get("mr")
    if mr is None or not mr.get("t1", False):
        return ()
    return ("t1", "radial", "axial") if mr.get("coordinates", False) else ("t1",)


def input_channels(config) -> int:
    """Channels of the network input: the degraded PET (the centre slice and its
    `task.context` neighbours on each side), the guidance channels, and a scanner task's FWHM
    channel (`petsr_jax.task`). `.get` with defaults: a config.json recorded before the task
    and mr fields existed has neither."""
    task = config.get("task", {})
    slices = 2 * int(task.get("context", 0)) + 1
    scanner = int(task.get("degradation", "bicubic") == "scanner")
    return slices + len(guidance_channels(config)) + scanner


def _is_range(text: str) -> bool:
    parts = text.split(":")
    return len(parts) == 2 and all(p.strip().isdigit() for p in parts)
