"""`rkd-fast train --config RUN_DIR/run.json --out NEW`: rerun a recorded run with the same options (seed
included), the flags given on the command line overriding the record.

run.json carries ``"format": "rkd_fast.run"`` and a format ``"version"``. A record without them, of a newer
version, or of another format, is refused; an older one is migrated (`MIGRATIONS`, one step per version). Options
the record has and this rkd_fast does not are refused, by name; options it lacks (added since) take their
defaults, with a warning naming them. Each method option is read back by its Option (`from_json`). What a rerun
never takes from the record: its output directory, --resume, --overwrite and the recorded command (`NOT_RERUN`)."""

import json
import warnings
from pathlib import Path

RUN_FORMAT = "rkd_fast.run"
RUN_VERSION = 1  # 1: the first versioned run.json (the config as TrainConfig.to_dict() writes it)
NOT_RERUN = ("out", "resume", "overwrite", "command")
# From version v to v + 1: a function of the record's config dict.
MIGRATIONS = {}


def record_header():
    """The keys that open every run.json: what `read_run_config` checks."""
    return {"format": RUN_FORMAT, "version": RUN_VERSION}


def read_run_config(path):
    """The training options recorded in `path` (a run.json, or a run directory holding one), migrated to this
    version, without `NOT_RERUN`: a dict for `make_config`. ValueError naming the file when it is not one this
    rkd_fast can read faithfully."""
    from .. import __version__
    from .config import TrainConfig
    from .methods import all_options

    path = Path(path)
    if path.is_dir():
        path = path / "run.json"
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file (expected a run.json written by `rkd-fast train`, or its "
                         f"run directory)")
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path} is not a JSON file ({error})") from error
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ValueError(f"--config {path} is not a run.json of `rkd-fast train` (no 'config' entry)")
    if "format" not in record or "version" not in record:
        raise ValueError(f"--config {path} has no format and version (not a run.json this rkd_fast wrote)")
    if record["format"] != RUN_FORMAT:
        raise ValueError(f"--config {path} has format {record['format']!r}, not {RUN_FORMAT!r}")
    version = record["version"]
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= RUN_VERSION:
        raise ValueError(f"--config {path} has run.json version {version!r}; this rkd_fast ({__version__}) reads "
                         f"versions 1 to {RUN_VERSION}: rerun it with the rkd_fast that wrote it, or upgrade")
    config = dict(record["config"])
    for step in range(version, RUN_VERSION):
        config = MIGRATIONS[step](config)
    fields = {f for f in TrainConfig.__dataclass_fields__}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"--config {path} records option(s) this rkd_fast does not have: {', '.join(unknown)}")
    missing = sorted(fields - set(config) - set(NOT_RERUN))
    if missing:
        warnings.warn(f"--config {path} does not record {', '.join(missing)} (options added since it was written): "
                      f"using their defaults", stacklevel=2)
    for name, (option, _) in all_options().items():
        if name in config:
            try:
                config[name] = option.from_json(config[name])
            except (TypeError, ValueError) as error:
                raise ValueError(f"--config {path}: {error}") from error
    return {key: value for key, value in config.items() if key not in NOT_RERUN}


# --- telling the flags given on the command line from the defaults ------------------------------------------

class Default:
    """An argparse default, wrapped so that `given` can tell it from a value typed on the command line (which may
    equal the default and must still override the record)."""

    def __init__(self, value):
        self.value = value

    def __str__(self):  # as the default shows in --help
        return str(self.value)

    def __repr__(self):
        return repr(self.value)


def mark_defaults(parser, names):
    """Wraps the defaults of the options `names` of `parser` in `Default` (append options excepted: argparse
    appends to their default, and an empty list already means "not given")."""
    for name in names:
        default = parser.get_default(name)
        if not isinstance(default, list) or default:
            parser.set_defaults(**{name: Default(default)})


def unwrap(value):
    return value.value if isinstance(value, Default) else value


def given(args, names):
    """{name: value} of the options `names` given on the command line (see `mark_defaults`)."""
    values = {}
    for name in names:
        value = getattr(args, name, Default(None))
        if not isinstance(value, Default) and value != []:
            values[name] = value
    return values
