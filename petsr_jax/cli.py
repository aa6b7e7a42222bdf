"""What every launch script shares on the command line: help that teaches, short log lines.

- `run(main, usage=..., example=..., required=...)` is `absl.app.run(main)` for a launch script:
  `--help` shows the script's docstring (its examples, one per line) followed by the config
  variants (`variants_help`); the script alone, or without a required flag, prints a usage
  line with an example and exits with status 2 instead of absl's "FATAL Flags parsing error";
  a bad `--config` ends with one line (`config.parse_flags`); log lines are short.
- `short_log_lines()`: absl's handler prints `warning: <message>` and plain info lines instead
  of `W1204 15:01:12.196732 140381670602688 enhance.py:182] <message>`; Python warnings
  (`warnings.warn`, e.g. an unfinished run loaded) print the same way. petsr_jax's own info
  lines (which convolution trains, a resumed run) show; other libraries' (Orbax logs every
  save) only from `--verbosity=0` on, which, like `--logger_levels`, keeps absl's meaning.
- `warning(message)`: the same `warning:` line, written between progress bars.
- `variant_workdirs()`: the workdir each variant trains into by default and the command that
  trains it, so a message about a missing workdir can say how to make one.
- `reporting(script, *errors)`: a script's work, where an error about the user's input (a
  config, a scan, a folder, a run: `user_errors`) ends the script with one line,
  `<script>: error: <message>`, and exit status 2 — the message says what to change; a
  traceback adds nothing.

The variants are read from the config files (`petsr_jax.config.variants`: their `VARIANTS`)
with a line each from `petsr_jax.config.FLAG_HELP`, so the help never lists a variant the files
do not define.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence

from petsr_jax import config as config_lib

# Exit status of a launch script stopped by its input (a usage error is 2 too).
INPUT_ERROR = 2
# The scale the variants' workdir names are shown at (the README's runs are 8×).
_HELP_SCALE = 8
# Help lines are wrapped to this many characters, as absl wraps the flags' help below them.
_HELP_WIDTH = 96
_HELP_FLAGS = {"--help", "-help", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull"}


def user_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """The errors that describe a user's input and say what to change: a bad config, scan,
    data root, checkpoint or workdir, a distributed launch set up wrong, and `extra`."""
    from petsr_jax import data, distributed, inference, io
    from petsr_jax.run import checkpoint, layout

    return (
        config_lib.ConfigError,
        distributed.DistributedError,
        data.DataError,
        io.ScanError,
        inference.InferenceError,
        checkpoint.CheckpointError,
        layout.WorkdirError,
        *extra,
    )


@contextlib.contextmanager
def reporting(script: str, *extra: type[BaseException]):
    """Run the `with` body; a `user_errors(*extra)` ends the script: one line on stderr,
    `<script>: error: <message>`, and exit status `INPUT_ERROR`."""
    try:
        yield
    except user_errors(*extra) as error:
        print(f"{script}: error: {error}", file=sys.stderr)
        raise SystemExit(INPUT_ERROR) from None


def _training_command(model: str, arg: str) -> str:
    return f"python launch/main.py --config=configs/{model}.py:{arg}"


def variant_workdirs(runs_dir: str = "runs", scales: Sequence[int] = (8, 12, 16)) -> dict:
    """Default workdir name → the command that trains into it, for each model, scale and
    single variant (and none: the paper protocol); empty without the config files."""
    from petsr_jax.run.identity import readable_name

    made = {}
    for model in config_lib.MODELS:
        for scale in scales:
            for variant in ["", *config_lib.variants(model)]:
                arg = f"scale={scale}" + (f",{variant}" if variant else "")
                try:
                    name = readable_name(config_lib.build_config(model, arg))
                except (config_lib.ConfigError, ValueError):
                    continue
                made.setdefault(name, _training_command(model, arg))
    return {f"{runs_dir}/{name}": command for name, command in made.items()}


def variants_help() -> str:
    """The config variants, what each is for and the workdir each trains at 8×, one per line."""
    from petsr_jax.run.identity import readable_name

    by_variant: dict[str, list[str]] = {}
    for model in sorted(config_lib.MODELS):  # deepsr first, the README's network
        for variant in config_lib.variants(model):
            config = config_lib.build_config(model, f"scale={_HELP_SCALE},{variant}")
            by_variant.setdefault(variant, []).append(f"runs/{readable_name(config)}")
    if not by_variant:
        return ""
    width = max(len(name) for name in [*by_variant, "(none)"])
    lines = [
        "Config variants, named after the colon and combined with commas, then field=value",
        "overrides (configs/deepsr.py and configs/srcnn.py define them in VARIANTS); each with",
        f"the workdirs it trains into at scale={_HELP_SCALE} (DeepSR, SRCNN):",
    ]
    indent = " " * (width + 4)
    for name, workdirs in sorted(by_variant.items()):
        about = config_lib.FLAG_HELP.get(name, "see VARIANTS in the config files")
        wrapped = textwrap.wrap(about, _HELP_WIDTH - len(indent))
        lines.append(f"  {name:<{width}}  {wrapped[0]}")
        lines += [indent + more for more in wrapped[1:]]
        lines.append(f"{indent}-> {', '.join(workdirs)}")
    lines.append(f"  {'(none)':<{width}}  the paper protocol (20×64 DeepSR, 50 epochs): a GPU job")
    return "\n".join(lines) + "\n"


def help_text(doc: str | None) -> str:
    """A launch script's `--help` text: its docstring, then the config variants."""
    doc = (doc or "").rstrip() + "\n"
    variants = variants_help()
    return doc + ("\n" + variants if variants else "")


def usage_text(program: str, usage: str, example: str) -> str:
    """`usage: ...`, `example: ...` and where the full help is: what a bare command prints."""
    return (
        f"usage: python {program} {usage}\n"
        f"example: {example}\n"
        f"python {program} --help lists the config variants, more examples and every flag"
    )


def run(
    main: Callable,
    *,
    usage: str,
    example: str,
    required: Sequence[str] = (),
) -> None:
    """`absl.app.run(main)` for a launch script (see the module docstring).

    `usage` is the script's arguments in one line (`--config=... [--workdir=<dir>]`), `example`
    a whole command that works as typed; `required` the flags without which nothing can run,
    checked here instead of with `flags.mark_flags_as_required` (whose message shows no
    example). The script's docstring becomes its `--help` text, followed by the variants.
    """
    from absl import app, flags

    module = sys.modules["__main__"]
    module.__doc__ = help_text(module.__doc__)
    program = os.path.relpath(sys.argv[0]) if sys.argv else "launch/<script>.py"

    def parse(argv: list[str]) -> list[str]:
        if required and len(argv) == 1:
            print(usage_text(program, usage, example), file=sys.stderr)
            sys.exit(2)
        try:
            argv = config_lib.parse_flags(argv)
        except SystemExit as stop:
            # absl ends --help with status 1; asking for help is not a failure.
            if stop.code == 1 and set(argv[1:]) & _HELP_FLAGS:
                sys.exit(0)
            raise
        missing = [name for name in required if flags.FLAGS[name].value is None]
        if missing:
            names = ", ".join(f"--{name}" for name in missing)
            print(
                f"{os.path.basename(program)}: error: {names} missing\n"
                + usage_text(program, usage, example),
                file=sys.stderr,
            )
            sys.exit(2)
        return argv

    def main_with_short_logs(argv):
        short_log_lines()
        return main(argv)

    app.run(main_with_short_logs, flags_parser=parse)


# --------------------------------------------------------------------------------------------
# Log lines
# --------------------------------------------------------------------------------------------


def _label(level: int, stream) -> str:
    """`warning: ` / `error: ` (bold and coloured on a terminal, so it stands out), or ``."""
    if level >= logging.ERROR:
        label, colour = "error:", "31"
    elif level >= logging.WARNING:
        label, colour = "warning:", "33"
    else:
        return ""
    tty = getattr(stream, "isatty", None)
    if tty is not None and tty() and "NO_COLOR" not in os.environ:
        label = f"\033[1;{colour}m{label}\033[0m"
    return label + " "


class ShortFormatter(logging.Formatter):
    """`warning: <message>` for warnings, `error: <message>` for errors, info as it is."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return _label(record.levelno, self.stream or sys.stderr) + text


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings as log lines: the message alone, without the file, line and source."""
    logging.getLogger("petsr_jax").warning("%s", message)


def short_log_lines() -> None:
    """Short log lines for a launch script's run (see the module docstring); call it after
    absl has parsed the flags (`run` does)."""
    from absl import flags
    from absl import logging as absl_logging

    verbosity_given = flags.FLAGS["verbosity"].present
    if not verbosity_given:
        absl_logging.get_absl_handler().setFormatter(ShortFormatter(sys.stderr))
        # Orbax logs every save and restore at INFO, which would bury the progress bars.
        absl_logging.set_verbosity(absl_logging.WARNING)
        if not flags.FLAGS["logger_levels"].present:
            logging.getLogger("petsr_jax").setLevel(logging.INFO)
    warnings.showwarning = _show_warning


def warning(message: str) -> None:
    """Print `warning: <message>` on stderr between progress bars: a result the user should
    stop at (an activity change, a model below bicubic), not a log detail."""
    from tqdm.auto import tqdm

    tqdm.write(_label(logging.WARNING, sys.stderr) + message, file=sys.stderr)
