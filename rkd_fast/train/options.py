"""A training option declared next to the code that reads it: a TrainConfig field, a `rkd-fast train` flag and its
check, in one `Option`. The training methods declare theirs (rkd_fast.train.methods); the checks here are the ones
every option of the trainer uses."""

import math
import numbers
from dataclasses import dataclass

from ..ops._dispatch import check_choice


def check_number(name, value, *, minimum=0.0, strict=False, integer=False, allow_none=False):
    """TypeError unless `value` is an int (integer) or a real number, not a bool; ValueError unless it is finite
    and >= minimum (> minimum when strict)."""
    if value is None and allow_none:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")


@dataclass(frozen=True)
class Option:
    """One setting of a training method. `default` is the TrainConfig field's; None there means "the method's
    own default" (the method's DEFAULTS, resolved when the config is made, so run.json records the value used).
    Numbers are checked against `minimum` (> it when `strict`; no generic check when minimum is None: the method
    checks them itself), strings against `choices`."""

    name: str
    default: object
    help: str
    type: type = float  # float, int, str or tuple (a repeatable flag)
    choices: tuple = ()
    minimum: float | None = 0.0
    strict: bool = False
    flag: str | None = None  # the command-line flag when it is not --NAME-WITH-DASHES
    metavar: str | None = None

    @property
    def cli_flag(self):
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value):
        if self.choices:
            check_choice(self.name, value, self.choices)
        elif self.type in (int, float) and self.minimum is not None:
            check_number(self.name, value, minimum=self.minimum, strict=self.strict, integer=self.type is int,
                         allow_none=self.default is None)

    def add_argument(self, group):
        """This option's flag in an argparse argument group."""
        kwargs = {"dest": self.name, "default": self.default, "help": self.help}
        if self.metavar:
            kwargs["metavar"] = self.metavar
        if self.type is tuple:
            kwargs.update(action="append", default=[])
        elif self.choices:
            kwargs["choices"] = self.choices
        else:
            kwargs["type"] = self.type
        group.add_argument(self.cli_flag, **kwargs)

