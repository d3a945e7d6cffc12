"""A training option declared next to the code that reads it: a TrainConfig field, a `rkd-fast train` flag and its
check, in one `Option`. The training methods declare theirs (rkd_fast.train.methods)."""

import argparse
from dataclasses import dataclass

from ..checks import check_choice, check_number


@dataclass(frozen=True)
class Option:
    """One setting of a training method. `default` is the TrainConfig field's; None there means "the method's
    own default" (the method's DEFAULTS, resolved when the config is made, so run.json records the value used).
    Numbers are checked against `minimum` (> it when `strict`; no generic check when minimum is None: the method
    checks them itself), strings against `choices`, booleans are `--flag`/`--no-flag` pairs. A tuple option is
    a repeatable flag whose items `item` turns into their canonical form (from the text typed after the flag, or
    what run.json records) and `item_text` back into that text.

    An option writes and reads its own values: `convert` (any accepted form to the config's), `to_json` and
    `from_json` (run.json), `to_argv` (the command-line words that give a value)."""

    name: str
    default: object
    help: str
    type: type = float  # float, int, str, bool or tuple (a repeatable flag)
    choices: tuple = ()
    minimum: float | None = 0.0
    strict: bool = False
    flag: str | None = None  # the command-line flag when it is not --NAME-WITH-DASHES
    metavar: str | None = None
    item: object = str  # tuple options: one item as the config holds it, from its text or its JSON form
    item_text: object = str  # tuple options: one item as typed after the flag

    def __post_init__(self):
        if self.type not in (float, int, str, bool, tuple):
            raise TypeError(f"option {self.name!r}: type must be float, int, str, bool or tuple, got {self.type!r}")
        if self.type is bool and not isinstance(self.default, bool):
            raise TypeError(f"boolean option {self.name!r} needs a default of True or False, got {self.default!r}")

    @property
    def cli_flag(self):
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def negative_flag(self):
        """A boolean option's flag that sets it to False."""
        return "--no-" + self.cli_flag.removeprefix("--")

    def check(self, value):
        if self.choices:
            check_choice(self.name, value, self.choices)
        elif self.type is bool and not isinstance(value, bool):
            raise TypeError(f"{self.name} must be True or False, got {value!r}")
        elif self.type in (int, float) and self.minimum is not None:
            check_number(self.name, value, minimum=self.minimum, strict=self.strict, integer=self.type is int,
                         allow_none=self.default is None)

    def convert(self, value):
        """`value` in the form the config holds: a tuple option's items converted (`item`) into a tuple; any
        other value as it is (`check` judges it)."""
        if self.type is not tuple or value is None:
            return value
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise TypeError(f"{self.name} must be a sequence ({self.cli_flag} given once per item), got {value!r}")
        return tuple(self.item(item) for item in value)

    def to_json(self, value):
        """`value` as run.json records it (tuples as lists, nested ones too)."""
        def plain(v):
            return [plain(item) for item in v] if isinstance(v, (tuple, list)) else v

        return plain(value)

    def from_json(self, data):
        """The config's value from what `to_json` wrote."""
        return self.convert(data)

    def to_argv(self, value):
        """The command-line words that set this option to `value` (none for a tuple option's empty value)."""
        if self.type is bool:
            return [self.cli_flag if value else self.negative_flag]
        if self.type is tuple:
            return [word for item in self.convert(value) for word in (self.cli_flag, self.item_text(item))]
        return [self.cli_flag, str(value)]

    def add_argument(self, group):
        """This option's flag in an argparse argument group."""
        kwargs = {"dest": self.name, "default": self.default, "help": self.help}
        if self.metavar:
            kwargs["metavar"] = self.metavar
        if self.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif self.type is tuple:
            kwargs.update(action="append", default=[])
        elif self.choices:
            kwargs["choices"] = self.choices
        else:
            kwargs["type"] = self.type
        group.add_argument(self.cli_flag, **kwargs)
