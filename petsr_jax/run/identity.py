"""Which run a workdir holds: one run identity, and refusals before anything is written.

A workdir holds the run its `config.json` records. Every field of a config defines the run (what
is learned, on what data, for how long, how it is scored) except `RUNTIME_FIELDS` — how and where
it computes: loader workers, logging cadence, convolution kernels, recomputation, the
distributed launch — and `EVALUATION_FIELDS`, which change what a finished run is scored with but
not its parameters (a rerun that changes only those scores the trained parameters again).
`check_same_run` refuses a workdir that holds another run, naming each differing field with its
two values, before anything is written; `main`, `reproduce` and `ablate` all go through it (via
`train.train_and_evaluate` or directly). It also refuses a config.json edited after training
(`checkpoint.check_config_unedited`: each checkpoint records the config it was trained with), and
`check_not_data` refuses a folder of scans or of anything else that is not a run.
`default_workdir` gives a readable name, plus a short hash of the defining fields when that name
is taken by another run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from petsr_jax.config import MODELS, base_config, flatten
from petsr_jax.run import layout
from petsr_jax.run.layout import WorkdirError

RUNTIME_FIELDS = (
    "data.num_workers",
    "distributed.",
    "model.conv",
    "model.remat",
    "train.log_every_steps",
    "train.keep_checkpoints",
)
EVALUATION_FIELDS = ("eval.",)


def _comparable(config_or_record) -> dict:
    """Flat `field -> value` of a config or of a recorded config.json; splits as counts."""
    tree = config_or_record if isinstance(config_or_record, dict) else config_or_record.to_dict()
    flat = flatten(json.loads(json.dumps(tree)))
    split = flat.get("data.split")
    if isinstance(split, str):
        parts = split.replace(",", "/").split("/")
        if all(p.strip().isdigit() for p in parts):
            flat["data.split"] = [int(p) for p in parts]
    return flat


def _with_added_defaults(recorded: dict) -> dict:
    """A recorded config.json with the fields it lacks filled from `base_config`'s defaults."""
    model = (recorded.get("model") or {}).get("name")
    if model not in MODELS:
        return recorded
    filled = json.loads(base_config(model).to_json())

    def overlay(into: dict, saved: dict) -> None:
        for key, value in saved.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                overlay(into[key], value)
            else:
                into[key] = value

    overlay(filled, recorded)
    return filled


def differences(recorded: dict, config, ignore: tuple[str, ...] = RUNTIME_FIELDS) -> list[str]:
    """`field: <recorded> in the workdir, <now> now` for each field where a recorded config
    (config.json) and `config` differ, leaving out fields starting with `ignore`. A field one
    side lacks shows as `<absent>`, except a field added to the project after the workdir was
    written: that run had the field's default behaviour (`config.base_config`), which is what it
    is compared with, so an older run is not taken for another config."""
    before, now = _comparable(_with_added_defaults(recorded)), _comparable(config)
    rows = []
    for key in sorted(set(before) | set(now)):
        if key.startswith(tuple(ignore)) or before.get(key) == now.get(key):
            continue
        rows.append(
            f"{key}: {before.get(key, '<absent>')!r} in the workdir, "
            f"{now.get(key, '<absent>')!r} now"
        )
    return rows


def defining_differences(recorded: dict, config) -> list[str]:
    """`differences` in the fields that change the trained parameters."""
    return differences(recorded, config, RUNTIME_FIELDS + EVALUATION_FIELDS)


def edited_fields(trained: dict, recorded: dict) -> list[str]:
    """`field: <trained> when trained, <recorded> in config.json` for each field that changes
    the trained parameters and differs between the config a checkpoint was trained with and the
    workdir's config.json. Fields only one side holds are left out: a field added to (or
    dropped from) the project between the two writes is not an edit."""
    before, now = _comparable(trained), _comparable(recorded)
    ignore = RUNTIME_FIELDS + EVALUATION_FIELDS
    return [
        f"{key}: {before[key]!r} when trained, {now[key]!r} in config.json"
        for key in sorted(set(before) & set(now))
        if not key.startswith(ignore) and before[key] != now[key]
    ]


def holds_run(workdir) -> bool:
    """True when a workdir holds trained state: checkpoints, best params or results."""
    workdir = Path(workdir)
    folders = (workdir / layout.CHECKPOINTS, workdir / layout.BEST)
    has_state = any(f.is_dir() and any(f.iterdir()) for f in folders)
    return has_state or (workdir / layout.RESULTS).exists()


def check_same_data(workdir, root) -> None:
    """Refuse a workdir whose run was trained on another data root than `root`.

    The default cohort's folder names its generator version, so after an upgrade that changes
    the cohort the same config reads other data: resuming would mix two datasets, and a
    finished run would answer with results of the old one.
    """
    info = layout.read_data_info(workdir)
    if not holds_run(workdir) or not info or not info.get("root"):
        return
    if Path(info["root"]).resolve() != Path(root).resolve():
        raise WorkdirError(
            f"{workdir} holds a run trained on {info['root']}; this config reads {root} (a newer "
            "cohort version, or another data root). Give another --workdir, or "
            f"--config.data.root={info['root']} to continue on the data it was trained on."
        )


def check_same_run(
    workdir, config, *, remedy: str = "Give another --workdir for this config"
) -> None:
    """Refuse a workdir that holds a run of another config, before anything is written.

    Raises `WorkdirError` naming every differing field that changes the trained parameters,
    with both values, and `remedy` (what the caller's user changes to pick another folder:
    `--workdir` for main, `--runs` for reproduce and ablate). A config.json edited after
    training is refused first, by its own name: it no longer says which run the workdir holds.
    A workdir without trained state (a run killed before its first checkpoint) holds nothing
    to protect and is accepted.
    """
    # Orbax is heavy and its module asks this one which fields define a run: imported here.
    from petsr_jax.run import checkpoint

    recorded = layout.read_config(workdir)
    if recorded is None or not holds_run(workdir):
        return
    try:
        checkpoint.check_config_unedited(workdir, recorded)
    except checkpoint.CheckpointError as error:
        raise WorkdirError(str(error)) from None
    rows = defining_differences(recorded, config)
    if recorded.get("model", {}).get("name") != config.model.name:
        # Another network altogether: its depth and width would only add noise.
        rows = [r for r in rows if not r.startswith(("model.num_blocks", "model.width"))]
    if rows:
        raise WorkdirError(
            f"{workdir} holds a run of another config ({'; '.join(rows)}). {remedy}, or rerun "
            "with the config the workdir records."
        )


# File names of scans: DICOM (also recognised by its "DICM" marker), NIfTI, Analyze, MINC, MGH.
SCAN_SUFFIXES = (".dcm", ".ima", ".nii", ".nii.gz", ".img", ".hdr", ".mnc", ".mgz", ".nrrd")
# How many files of a subfolder are looked at to tell a DICOM series folder.
_FILES_LOOKED_AT = 20
_MAX_NAMED = 5


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _is_scan(entry: Path) -> bool:
    """A scan file, or a folder holding scan files directly (a DICOM series)."""
    if entry.is_file():
        return entry.name.lower().endswith(SCAN_SUFFIXES) or _is_dicom_file(entry)
    if entry.is_dir():
        try:
            files = [p for _, p in zip(range(_FILES_LOOKED_AT), entry.iterdir(), strict=False)]
        except OSError:
            return False
        return any(p.is_file() and _is_scan(p) for p in files)
    return False


def check_not_data(workdir) -> None:
    """Refuse, before anything is written, a workdir that holds scans, or that holds things
    that are not a run's and no config.json: a run's checkpoints, logs and results would be
    written among someone's data (`--workdir` given a DICOM folder by mistake).

    A folder that does not exist yet, an empty one, and a run's own workdir are accepted.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        return
    entries = sorted(e for e in workdir.iterdir() if not e.name.startswith("."))
    scans = [e for e in entries if e.name not in layout.ENTRIES and _is_scan(e)]
    if scans:
        raise WorkdirError(
            f"workdir {workdir} holds scans ({_named(scans)}); a run writes checkpoints, logs "
            "and results into its workdir and must not mix them with data: give --workdir a "
            "new or empty folder (e.g. runs/<name>)"
        )
    if (workdir / layout.CONFIG).is_file():
        return
    foreign = [e for e in entries if e.name not in layout.ENTRIES]
    if foreign:
        raise WorkdirError(
            f"workdir {workdir} is not a petsr_jax run (it has no config.json) and holds other "
            f"things ({_named(foreign)}); give --workdir a new or empty folder (e.g. "
            "runs/<name>)"
        )


def _named(entries: list[Path]) -> str:
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:_MAX_NAMED]]
    more = len(entries) - _MAX_NAMED
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def fingerprint(config) -> str:
    """A short hash of the fields that define a run."""
    flat = {
        k: v
        for k, v in _comparable(config).items()
        if not k.startswith(RUNTIME_FIELDS + EVALUATION_FIELDS)
    }
    return hashlib.sha1(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:8]


def readable_name(config) -> str:
    """`<model>_x<scale>` (`<model>_scanner` for a scanner task), plus the cohort preset, depth
    and domain where not the paper's, `_c<k>` for k neighbouring slices each side, `_kept` for a
    bicubic task that keeps activity, and `_mr` for MR guidance."""
    task = config.get("task", {})
    scanner = task.get("degradation", "bicubic") == "scanner"
    name = f"{config.model.name}_scanner" if scanner else f"{config.model.name}_x{config.scale}"
    on_phantoms = scanner and config.scanner.data == "phantoms"
    if not config.data.root and not on_phantoms and config.data.cohort != "paper":
        name += f"_{config.data.cohort}"
    if config.model.name == "deepsr" and config.model.num_blocks != 20:
        name += f"_b{config.model.num_blocks}"
    if config.data.domain != "physical":
        name += f"_{config.data.domain}"
    if task.get("context", 0):
        name += f"_c{task.context}"
    if not scanner and task.get("consistency", "none") != "none":
        name += "_kept"
    if config.get("mr") is not None and config.mr.t1:  # MR-guided beside its PET-only twin
        name += "_mr_coords" if config.mr.coordinates else "_mr"
    return name


def default_workdir(config, runs_dir="runs") -> Path:
    """`runs/<readable name>`, or `runs/<readable name>-<fingerprint>` when the readable folder
    holds a run of another config — so differing configs never share a default workdir, and
    the first run of a name keeps the name a person would type."""
    readable = Path(runs_dir) / readable_name(config)
    recorded = layout.read_config(readable) if readable.is_dir() else None
    if recorded is None or not holds_run(readable) or not defining_differences(recorded, config):
        return readable
    return readable.with_name(f"{readable.name}-{fingerprint(config)}")
