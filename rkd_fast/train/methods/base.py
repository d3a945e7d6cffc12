"""What a training method is, and the registry of them.

A method is one class, registered with ``@register``: its ``name`` (the --method value), whether it distils a
teacher (``needs_teacher``), its own settings (``OPTIONS``: TrainConfig fields and `rkd-fast train` flags, see
rkd_fast.train.options), the defaults it gives shared settings (``DEFAULTS``), the cross-option rules (``check``),
what one step costs (``cost_units``), the settings `rkd-fast bench` also times it with (``BENCH_VARIANTS``), what
it needs done to the student before training (``prepare_student``), and where it appears in the comparisons
(``baseline``: the demo's --all; ``in_study`` and ``STUDY_VARIANTS``: the frontier study). Adding a method is
adding a module with its class to this package, and its test; a class registered later (a user's own module) is a
method as well.

A method is built once per run with ``Method(student, teacher, run, opt, example_input, autocast)`` and called as
``total, terms = method(x, y, step_seed)``: ``total`` a 0-d float32 tensor to backpropagate, ``terms`` a dict of
detached 0-d tensors (no host sync). ``run`` holds the run's shared settings (RunSettings), ``opt`` the method's
own, resolved (a namespace of its OPTIONS); it never sees the whole config. ``autocast()`` returns the context the
forward passes run in (the run's mixed precision). ``step_seed`` seeds any randomness of the step (the attacks'
random starts), so a resumed run replays it. A method that computes something per training sample beforehand
(``plan_precompute``) is also given the batch's sample indices. A method's own trainable parameters (the feature
adapters) are ``method.parameters()`` and its state is ``method.state_dict()``.
"""

import types
from dataclasses import dataclass, replace

from torch import nn

from ...datasets import DATASETS
from ...models import model_info
from ...student_teacher import HoldsStudentTeacher

METHODS = {}  # name → Method subclass, in registration order
_ON_CHANGE = []  # called after a method is registered or removed (TrainConfig adds or drops its options' fields)


# --alpha's default in units of eps: PGD's step eps / 4 (pgd-at's, the other attacking methods' unless they say
# otherwise, and the robust validation's)
ALPHA_OF_EPS = 0.25


@dataclass(frozen=True)
class RunSettings:
    """The settings of a run every method may read. A method receives them resolved: eps (the data set's when not
    given) and alpha, the attack step (the method's `alpha_of_eps` · eps when not given); `create` resolves an
    alpha of None."""

    eps: float
    alpha: float | None
    attack_steps: int
    precision: str
    label_smoothing: float
    batch_size: int  # per process
    arch: str  # the student's architecture
    teacher_arch: str | None  # the teacher's, when there is one


class Method(HoldsStudentTeacher, nn.Module):
    """Base: holds the student and teacher by reference (not as submodules), like RobustKDLoss."""

    name = None
    needs_teacher = False
    OPTIONS = ()  # this class's own Options; a subclass has its bases' too
    DEFAULTS = {}  # name → value for the options whose default (None) this method resolves
    replays = 1  # optimizer steps the trainer takes on each batch
    alpha_of_eps = ALPHA_OF_EPS  # the attack step when --alpha is not given, in units of eps
    baseline = False  # a method robust-kd is measured against: `rkd-fast demo --all` trains it
    in_study = True  # `rkd-fast frontier` runs it unless --methods says otherwise
    # This class's own further entries of the frontier study (read from the class itself, not inherited):
    # variant name -> options over the method's defaults; options named "<option>_eps" are in units of eps.
    STUDY_VARIANTS = {}
    # suffix → options: step cases `rkd-fast bench` times besides the defaults, as "NAME:SUFFIX" (read from the
    # class itself, not inherited)
    BENCH_VARIANTS = {}

    def __init__(self, student, teacher, run, opt, example_input, autocast):
        super().__init__()
        self.hold(student, teacher)
        self.run, self.opt, self.autocast = run, opt, autocast
        if teacher is not None:
            teacher.eval()

    @classmethod
    def options(cls):
        """name → Option of every setting this method reads, its bases' first."""
        found = {}
        for klass in reversed(cls.__mro__):
            for option in vars(klass).get("OPTIONS", ()):
                found[option.name] = option
        return found

    @classmethod
    def check(cls, opt):
        """ValueError for a combination of this method's settings (`opt`, resolved) that cannot train."""

    @classmethod
    def cost_units(cls, opt, attack_steps):
        """One optimizer step with settings `opt` in forward/backward units (rkd_fast.bench.steps.cost_units
        explains them); None when this method has no cost model."""
        return None

    def plan_precompute(self, fixed_inputs):
        """Whether this run computes something per training sample before its first step; `fixed_inputs`: whether
        each training sample reaches the steps as one fixed input (an unaugmented split held in memory). If so the
        trainer calls `precompute` once per run (again after a resume) and serves each batch with its samples'
        positions in the split: ``method(x, y, step_seed, indices)``. ValueError where an option asks for it and
        it cannot be done."""
        return False

    def precompute(self, batches):
        """`batches`: ``(x, y)`` of every training sample once, in index order, as the steps see them."""
        raise NotImplementedError(f"method {self.name!r} precomputes nothing")

    def prepare_student(self, *, compile, sync_bn, world_size):
        """Called once the student is built (SyncBatchNorm converted when sync_bn) and before it is compiled:
        ValueError when this method cannot train it so, or the conversion of self.student the method needs."""


def register(cls):
    """Class decorator: adds a Method subclass to METHODS, at import or any time later (its options become
    TrainConfig fields and `rkd-fast train` flags). An option another method declares too must be the same
    declaration (one TrainConfig field, one flag)."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"a method needs a unique name, got {cls.name!r}")
    declared = all_options()
    for name, option in cls.options().items():
        if name in declared and declared[name][0] != option:
            raise ValueError(f"method {cls.name!r} declares option {name!r} unlike {declared[name][1]}")
    METHODS[cls.name] = cls
    _changed()
    return cls


def unregister(name):
    """Removes the method `name` (and the TrainConfig fields of the options no other method reads)."""
    del METHODS[name]
    _changed()


def on_change(callback):
    """Calls `callback()` whenever a method is registered or removed."""
    _ON_CHANGE.append(callback)


def _changed():
    for callback in _ON_CHANGE:
        callback()


def all_options():
    """name → (Option, names of the methods that read it), over every registered method."""
    found = {}
    for method, cls in METHODS.items():
        for name, option in cls.options().items():
            owners = found.get(name, (option, ()))[1]
            found[name] = (option, (*owners, method))
    return found


def baseline_methods():
    """The methods declared baselines, in registration order."""
    return tuple(name for name, cls in METHODS.items() if cls.baseline)


def study_variants():
    """Every entry the frontier study can run: variant -> (method, options), each method's own name first (its
    defaults), then its STUDY_VARIANTS; in registration order."""
    variants = {}
    for name, cls in METHODS.items():
        variants[name] = (name, {})
        for variant, options in vars(cls).get("STUDY_VARIANTS", {}).items():
            variants[variant] = (name, dict(options))
    return variants


def default_study_variants():
    """The study's entries unless --methods: those of the methods with ``in_study``."""
    return tuple(v for v, (method, _) in study_variants().items() if METHODS[method].in_study)


def teacher_methods():
    return tuple(name for name, cls in METHODS.items() if cls.needs_teacher)


def method_defaults(method, dataset=None):
    """The defaults of `method`'s options left None on `dataset`: the method's DEFAULTS, and over them the data
    set's own (DatasetInfo.method_defaults); None or an unknown name: the method's alone."""
    info = DATASETS.get(dataset)
    return {**METHODS[method].DEFAULTS, **(info.method_defaults.get(method, {}) if info else {})}


def resolve_options(method, values, dataset=None):
    """`values` (option name → value; missing or None: the default on `dataset`, `method_defaults`) as the
    namespace a method reads."""
    cls = METHODS[method]
    unknown = sorted(set(values) - set(cls.options()))
    if unknown:
        raise TypeError(f"method {method!r} has no option(s) {', '.join(unknown)}")
    defaults = method_defaults(method, dataset)
    resolved = {}
    for name, option in cls.options().items():
        value = values.get(name, option.default)
        resolved[name] = defaults.get(name) if value is None else value
    return types.SimpleNamespace(**resolved)


def _with_alpha(cls, run):
    return run if run.alpha is not None else replace(run, alpha=cls.alpha_of_eps * run.eps)


def create(method, student, teacher, run, example_input, autocast, dataset=None, **options):
    """The method `method` for a run: `run` a RunSettings (alpha None: the method's default), `options` its own
    settings (the rest take their defaults on `dataset`, as `rkd-fast train --dataset` does), checked here."""
    cls = METHODS[method]
    opt = resolve_options(method, options, dataset)
    cls.check(opt)
    return cls(student, teacher, _with_alpha(cls, run), opt, example_input, autocast)


def build_method(cfg, student, teacher, example_input, autocast):
    """The method of a TrainConfig (made by make_config, which checked its options): its shared settings, eps
    resolved by the config (`attack_eps`), and its own options read from `cfg`."""
    cls = METHODS[cfg.method]
    teacher_arch = (model_info(teacher).get("arch") or cfg.teacher_arch or cfg.arch) if teacher is not None else None
    run = RunSettings(eps=cfg.attack_eps(), alpha=cfg.alpha, attack_steps=cfg.attack_steps, precision=cfg.precision,
                      label_smoothing=cfg.label_smoothing, batch_size=cfg.batch_size, arch=cfg.arch,
                      teacher_arch=teacher_arch)
    opt = resolve_options(cfg.method, {name: getattr(cfg, name) for name in cls.options()}, cfg.dataset)
    return cls(student, teacher, _with_alpha(cls, run), opt, example_input, autocast)
