"""RobustKDLoss: the robust knowledge-distillation objective for one training step.

    total = ce_weight · CE(student(x), y)
          + kd_weight · T² · KL(softmax(teacher(x)/T) ‖ softmax(student(x)/T))
          + feat_weight · mean over feature pairs of feature_distance(adapter(F_s), F_t)
          + jac_weight · jacobian_penalty(student, x, teacher=teacher, ...)

Where the terms are evaluated. Without ``eps`` (Zhang & Yi's recipe): CE, KD and features at the input x, and the
Jacobian term along a random direction (`jacobian_penalty`). With ``eps`` (the trainer's default): at the
student's single-step adversarial point x' in the L∞ threat model of radius eps, built as N-FGSM builds it (de
Jorge et al. 2022): a start x̃ = x + η, η uniform in [−noise·eps, noise·eps], then one step of h along the sign of
the input gradient of the student's cross-entropy at x̃, h = eps by default, clamped to [0, 1]. CE, KD and the
feature maps are matched at x' (the teacher's soft labels and features where the student is weakest; with
``teacher_at="clean"`` the teacher's at x are the targets, as in ARD and RSLAD), and the
Jacobian term is the finite difference along that step: ‖(S(x') − S(x̃))/h − (T(x') − T(x̃))/h‖². One
gradient pass of the student finds x' (the attack pass, eval mode, no parameter gradients); with jac_weight 0
the step is then one student forward + backward at x' and one teacher forward: what single-step adversarial
training costs plus a teacher forward (docs/frontier.md).

Feature maps are captured with forward hooks on the named modules (model code is not changed). The hooks record
only the forward the terms are evaluated at (x, or x'): they are armed before it and disarm themselves when the
model's forward returns, so the other forwards (the Jacobian term's, the attack pass) pass through unrecorded.
Module names are those of the bare model (rkd_fast.model_source: ``layer4``, not ``model.layer4``); a token
sequence (N, L, C) is compared as a map (`rkd_fast.model_source.as_feature_map`: its patches as an (N, C, s, s)
grid when they make a square, else (N, C, L, 1)), and the (N, H, W, C) maps of a timm model whose ``output_fmt``
is NHWC as (N, C, H, W) ones.

The student and teacher are held by reference, not as submodules: `parameters()`, `state_dict()`, `.to()` and
`.train()` of the loss see only the feature adapters.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import seeding
from .checks import check_number
from .clean_pass import CleanPassState, clean_rows, shares_clean_statistics
from .jacobian import check_options, jacobian_penalty
from .model_source import as_feature_map, nhwc_maps, token_prefix
from .ops.fd_jacobian import fd_jacobian_loss
from .ops.feature_distance import MODES as FEATURE_MODES
from .ops.feature_distance import feature_distance
from .student_teacher import HoldsStudentTeacher

# jacobian_penalty keyword arguments a caller may set through `jacobian={...}`; the loss supplies the others.
JACOBIAN_OPTIONS = ("h", "direction", "norm", "on", "temperature", "fraction", "estimator")
JACOBIAN_DEFAULTS = {"direction": "gaussian"}
# N-FGSM's start noise, in units of eps (de Jorge et al. 2022: uniform in [−2·eps, 2·eps])
ADVERSARIAL_NOISE = 2.0
# the samples the soft-label term is on: all, or those whose label the teacher predicts where it is asked
KD_SAMPLES = ("all", "teacher-correct")
# the input of the teacher's targets (soft labels, features): the student's (x', or x without eps), or the clean x
# (ARD's and RSLAD's targets)
TEACHER_AT = ("student", "clean")


def resize_matrix(src, dst, pool):
    """The (dst, src) matrix of a 1-D resize: adaptive average pooling (`pool`, as F.adaptive_avg_pool1d: output
    i averages inputs [floor(i·src/dst), ceil((i+1)·src/dst))) or linear interpolation (as F.interpolate with
    align_corners=False: source position (i + 0.5)·src/dst − 0.5, clamped at 0), in float64."""
    m = torch.zeros(dst, src, dtype=torch.float64)
    for i in range(dst):
        if pool:
            begin, end = (i * src) // dst, -(-(i + 1) * src // dst)
            m[i, begin:end] = 1.0 / (end - begin)
        else:
            pos = max((i + 0.5) * src / dst - 0.5, 0.0)
            i0 = int(pos)
            i1, frac = min(i0 + 1, src - 1), pos - int(pos)
            m[i, i0] += 1.0 - frac
            m[i, i1] += frac
    return m


class FeatureAdapter(nn.Module):
    """Maps a student feature to the teacher's shape: a 1×1 conv (or a linear map for 2-D features) where the
    channel counts differ, then adaptive average pooling (student map larger) or bilinear interpolation
    (smaller) where the spatial sizes differ.

    The resize is two small matrix products (`resize_matrix` per axis, in float32) rather than
    F.adaptive_avg_pool2d / F.interpolate: the same function, but their CUDA backwards have no deterministic
    implementation, so `--deterministic` training on a GPU would refuse them."""

    def __init__(self, student_shape, teacher_shape, *, map_channels=True):
        super().__init__()
        c_s, c_t = student_shape[1], teacher_shape[1]
        self.size = tuple(teacher_shape[2:])
        self.resize = tuple(student_shape[2:]) != self.size
        self.pool = all(s >= t for s, t in zip(student_shape[2:], self.size))
        if self.resize:  # not in the state_dict: a function of the shapes
            for name, src, dst in zip(("resize_h", "resize_w"), student_shape[2:], self.size):
                self.register_buffer(name, resize_matrix(src, dst, self.pool).float(), persistent=False)
        if not map_channels or c_s == c_t:
            self.proj = nn.Identity()
        elif len(student_shape) == 4:
            self.proj = nn.Conv2d(c_s, c_t, kernel_size=1, bias=False)
        else:
            self.proj = nn.Linear(c_s, c_t, bias=False)

    def forward(self, x):
        x = self.proj(x)
        if self.resize:
            acc = torch.promote_types(x.dtype, torch.float32)  # weights such as 1/3 are not exact in bf16
            channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
                memory_format=torch.channels_last)
            with torch.autocast(x.device.type, enabled=False):
                y = torch.einsum("nchw,ih,jw->ncij", x.to(acc), self.resize_h.to(acc), self.resize_w.to(acc))
            # the layout of the input (the teacher's maps usually share it, so the distance reads both in place)
            x = y.to(x.dtype).contiguous(memory_format=torch.channels_last if channels_last else
                                         torch.contiguous_format)
        return x


class _Capture:
    """Hook state shared by the hooks of one model. Kept outside the loss so the hooks (owned by the model)
    do not keep the loss alive."""

    def __init__(self, count):
        self.armed = False
        self.features = [None] * count
        self.rows = slice(None)

    def arm(self, rows=slice(None)):
        """Records the next forward's features, rows `rows` of them (a batched call holds other passes too)."""
        self.features = [None] * len(self.features)
        self.armed, self.rows = True, rows


def _named_modules(model, names, side):
    from .model_source import find_module

    return [find_module(model, name, side) for name in names]


class RobustKDLoss(HoldsStudentTeacher, nn.Module):
    """The distillation loss of a student against a frozen teacher; ``total, terms = loss_fn(x, y)``.

    Args:
        student, teacher: models taking inputs in [0, 1] and returning logits. The teacher is frozen here
            (``requires_grad_(False)``, eval mode; a convolutional one is converted to channels_last, its fastest
            layout) and always run under ``torch.no_grad()``.
        feature_pairs: ``[(student_module_name, teacher_module_name), ...]`` whose outputs are matched by
            the feature term. Where the shapes differ a student-side :class:`FeatureAdapter` is created now,
            so an optimizer built from ``loss_fn.parameters()`` right after sees it.
        example_input: a batch the shapes are read from (both models run on it once, in eval mode, under
            no_grad). Needed when ``feature_pairs`` is not empty.
        feature_mode: ``"normalized"``, ``"mse"`` or ``"attention"`` (see :func:`rkd_fast.feature_distance`).
            Attention maps allow differing channel counts, so no channel adapter is made in that mode.
        ce_weight, kd_weight, feat_weight, jac_weight: the terms' weights; a weight of 0 skips its term, and
            when kd, feat and jac are all 0 the teacher is not run.
        kd_temperature: T of the KD term (the term is multiplied by T²).
        kd_samples: ``"all"``, or ``"teacher-correct"``: the KD term only on the samples whose label the teacher
            predicts at the input it sees (the others add 0; the term stays a mean over the batch).
        label_smoothing: of the cross-entropy term.
        jacobian: keyword arguments of :func:`rkd_fast.jacobian.jacobian_penalty` (h, direction, norm, on,
            temperature, fraction, estimator); ``direction`` defaults to ``"gaussian"``. With ``eps``, only ``h``
            (the step, default eps), ``on`` and ``temperature`` apply: the direction is the adversarial one.
        eps: None, or the L∞ radius of the threat model (on the [0, 1] pixel scale): evaluate every term at the
            student's single-step adversarial point (module docstring).
        noise: with ``eps``: the start's uniform noise, in units of eps (N-FGSM's 2).
        steps: with ``eps``: 1, the N-FGSM point (the default); k ≥ 2, a PGD-k point instead (Madry et al.: a
            uniform start in the eps-ball, k signed-gradient steps of ``alpha``, each projected onto the ball), as
            the pgd-at baseline takes it; the Jacobian term needs the single step (``jac_weight`` 0).
        alpha: with ``steps`` ≥ 2: the PGD step on the [0, 1] pixel scale (default eps / 2, the pgd-2 baseline's).
        teacher_at: where the teacher's soft labels and feature maps come from: ``"student"``, the student's input
            (x', or x without ``eps``), or ``"clean"``, the input x, as ARD and RSLAD take them (with ``eps`` the
            targets then do not move with the student's attack; the Jacobian term still compares the teacher's
            change between x̃ and x').

    Returns ``(total, terms)``: ``total`` a 0-d float32 tensor with a gradient, ``terms`` a dict of detached
    0-d tensors (``"ce"``, ``"kd"``, ``"feat"``, ``"jac"`` for the terms computed, and ``"total"``). Nothing
    in the call reads a value back to the host.
    """

    def __init__(self, student, teacher, *, feature_pairs=(), example_input=None, feature_mode="normalized",
                 ce_weight=1.0, kd_weight=1.0, kd_temperature=4.0, kd_samples="all", feat_weight=1.0, jac_weight=1.0,
                 label_smoothing=0.0, jacobian=None, eps=None, noise=ADVERSARIAL_NOISE, steps=1, alpha=None,
                 teacher_at="student"):
        super().__init__()
        for name, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
        if feature_mode not in FEATURE_MODES:
            raise ValueError(f"unknown feature_mode {feature_mode!r}; expected one of {', '.join(FEATURE_MODES)}")
        self.ce_weight = check_number("ce_weight", ce_weight)
        self.kd_weight = check_number("kd_weight", kd_weight)
        self.feat_weight = check_number("feat_weight", feat_weight)
        self.jac_weight = check_number("jac_weight", jac_weight)
        self.kd_temperature = check_number("kd_temperature", kd_temperature, strict=True)
        if kd_samples not in KD_SAMPLES:
            raise ValueError(f"unknown kd_samples {kd_samples!r}; expected one of {', '.join(KD_SAMPLES)}")
        self.kd_samples = kd_samples
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.feature_mode = feature_mode
        jacobian = dict(jacobian or {})
        unknown = sorted(set(jacobian) - set(JACOBIAN_OPTIONS))
        if unknown:
            raise ValueError(f"unknown jacobian option(s) {', '.join(unknown)}; allowed: {', '.join(JACOBIAN_OPTIONS)}")
        if eps is not None:
            self.eps = check_number("eps", eps)
            self.noise = check_number("noise", noise)
            if self.eps == 0:
                raise ValueError("eps must be > 0 (or None: the terms at the clean input)")
            fixed = sorted(set(jacobian) - {"h", "on", "temperature"})
            if fixed:
                raise ValueError(f"jacobian option(s) {', '.join(fixed)} do not apply with eps: the step is along the "
                                 "sign of the student's input gradient, on the whole batch, by finite difference")
            self.jacobian = {"h": self.eps, "on": "logits", "temperature": 1.0, **jacobian}
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
            if steps > 1 and self.jac_weight > 0:
                raise ValueError(f"steps={steps} with the Jacobian term: its finite difference runs along the single "
                                 "N-FGSM step (steps=1), or set jac_weight=0")
            self.steps = steps
            self.alpha = self.eps / 2 if alpha is None else check_number("alpha", alpha, strict=True)
        else:
            if steps != 1 or alpha is not None:
                raise ValueError("steps and alpha set the adversarial point: they apply with eps")
            self.eps = None
            self.jacobian = {**JACOBIAN_DEFAULTS, **jacobian}
        if teacher_at not in TEACHER_AT:
            raise ValueError(f"unknown teacher_at {teacher_at!r}; expected one of {', '.join(TEACHER_AT)}")
        self.teacher_at = teacher_at
        check_options(**self.jacobian)  # now, not at the first step

        # Held by reference (a tuple is not registered as a submodule): the loss's state_dict and train()
        # never touch the models.
        self.hold(student, teacher)
        teacher.requires_grad_(False)
        teacher.eval()
        # The teacher only runs forward: a convolutional one runs in channels_last, its fastest layout for the
        # convolutions and pooling of oneDNN (CPU) and cuDNN (GPU); measured in docs/frontier.md.
        self._teacher_layout = torch.channels_last if any(
            isinstance(m, nn.Conv2d) for m in teacher.modules()) else None
        if self._teacher_layout is not None:
            teacher.to(memory_format=self._teacher_layout)

        feature_pairs = [tuple(pair) for pair in feature_pairs]
        if any(len(pair) != 2 or not all(isinstance(n, str) for n in pair) for pair in feature_pairs):
            raise ValueError("feature_pairs must be (student_module_name, teacher_module_name) string pairs, "
                             f"got {feature_pairs!r}")
        if self.feat_weight == 0:
            feature_pairs = []  # a skipped term needs neither hooks nor adapters
        self.feature_pairs = feature_pairs
        self._captures = (_Capture(len(feature_pairs)), _Capture(len(feature_pairs)))
        self._hooks = []
        if feature_pairs:
            for side, model, names, capture in (("student", student, [p[0] for p in feature_pairs], self._captures[0]),
                                                ("teacher", teacher, [p[1] for p in feature_pairs], self._captures[1])):
                prefix, nhwc = token_prefix(model), nhwc_maps(model)
                for i, module in enumerate(_named_modules(model, names, side)):
                    self._hooks.append(module.register_forward_hook(_record_hook(capture, i, prefix, nhwc)))
                # Registered after the feature hooks and on the root, so it runs when the whole forward is done.
                self._hooks.append(model.register_forward_hook(_disarm_hook(capture)))
        elif self.feat_weight > 0:
            raise ValueError("feat_weight > 0 needs feature_pairs (or set feat_weight=0)")

        self.adapters = nn.ModuleList()
        if example_input is not None:
            self._inspect(example_input)
        elif feature_pairs:
            raise ValueError("example_input is needed to read the feature shapes and build the adapters")

    @property
    def uses_teacher(self):
        return self.kd_weight > 0 or self.feat_weight > 0 or self.jac_weight > 0

    @property
    def takes_teacher_logits(self):
        """Whether the teacher's one output the loss needs is its logits at the clean input: the soft labels
        alone, taken at x (without ``eps``, or ``teacher_at="clean"``). Then ``forward`` accepts them computed
        beforehand (``teacher_logits``) and does not run the teacher."""
        return (self.kd_weight > 0 and self.feat_weight == 0 and self.jac_weight == 0
                and (self.eps is None or self.teacher_at == "clean"))

    def teacher_logits(self, x):
        """The teacher's logits at x (no_grad), as a step of this loss computes them: what ``forward`` takes as
        ``teacher_logits`` for the same samples."""
        with torch.no_grad():
            return self._teach(x)

    def _inspect(self, example_input):
        """Runs both models once on example_input (eval mode, no_grad; training flags restored) to check the
        class counts agree and to build an adapter for each feature pair."""
        student, teacher = self._models
        was_training = student.training
        try:
            student.eval()
            for capture in self._captures:
                capture.arm()
            with torch.no_grad():
                s_logits = student(example_input)
                t_logits = self._teach(example_input) if self.uses_teacher else None
        finally:
            student.train(was_training)
            for capture in self._captures:
                capture.armed = False
        if t_logits is not None and s_logits.shape[1:] != t_logits.shape[1:]:
            raise ValueError(f"student and teacher disagree on the number of classes: student outputs "
                             f"{tuple(s_logits.shape[1:])}, teacher {tuple(t_logits.shape[1:])}")
        for (s_name, t_name), s_feat, t_feat in zip(self.feature_pairs, *[c.features for c in self._captures]):
            for side, name, feat in (("student", s_name, s_feat), ("teacher", t_name, t_feat)):
                if not isinstance(feat, torch.Tensor):
                    raise ValueError(f"feature layer {name!r} of the {side} " + (
                        "did not run in its forward" if feat is None else
                        f"returns a {type(feat).__name__}, not a tensor") + ": pick another module "
                        "(`rkd-fast layers` lists them with their outputs)")
            s_shape, t_shape = tuple(s_feat.shape), tuple(t_feat.shape)
            if len(s_shape) != len(t_shape) or len(s_shape) not in (2, 4):
                raise ValueError(f"feature pair ({s_name!r}, {t_name!r}): student output {s_shape} and teacher "
                                 f"output {t_shape} must both be (N, C) or (N, C, H, W)")
            map_channels = self.feature_mode != "attention"
            if s_shape[1:] == t_shape[1:] or (not map_channels and s_shape[2:] == t_shape[2:]):
                self.adapters.append(nn.Identity())
            else:
                adapter = FeatureAdapter(s_shape, t_shape, map_channels=map_channels)
                self.adapters.append(adapter.to(device=s_feat.device))
        for capture in self._captures:
            capture.features = [None] * len(capture.features)

    def _teach(self, x):
        """The teacher's logits for x, in the teacher's layout."""
        if self._teacher_layout is not None and x.dim() == 4:
            x = x.contiguous(memory_format=self._teacher_layout)
        return self.teacher(x)

    def remove_hooks(self):
        """Detaches the feature hooks from the models (the loss cannot compute the feature term after)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def forward(self, x, y, seed=None, teacher_logits=None):
        """``(total, terms)`` for the batch (x, y). ``seed`` seeds the step's random draws, the adversarial start's
        noise (with ``eps``) or the Jacobian term's directions (without), from local generators, so a rerun or a
        resumed run replays them; None: fresh draws (torch's global generator for the directions).
        ``teacher_logits``: the teacher's logits at x, computed beforehand (`teacher_logits`), where the soft labels
        at x are all the loss asks of the teacher (`takes_teacher_logits`); the teacher is then not run."""
        if teacher_logits is not None:
            if not self.takes_teacher_logits:
                raise ValueError("teacher_logits replace the teacher's forward only where its soft labels at the clean "
                                 "input are all the loss uses (kd_weight > 0, feat_weight and jac_weight 0, and "
                                 "teacher_at='clean' with eps)")
            if teacher_logits.shape[0] != x.shape[0]:
                raise ValueError(f"teacher_logits hold {teacher_logits.shape[0]} rows for a batch of {x.shape[0]}")
        elif self.teacher.training:  # someone called teacher.train(): BN statistics must stay frozen
            self.teacher.eval()
        terms = {}
        total = None

        def add(name, weight, value):
            nonlocal total
            value = value.float()
            terms[name] = value.detach()
            total = weight * value if total is None else total + weight * value

        passes = (self._adversarial_passes(x, y, seed, teacher_logits) if self.eps is not None
                  else self._clean_passes(x, y, seed, teacher_logits))
        s_logits, t_logits, jac = passes
        if t_logits is not None:
            t_logits = t_logits.detach()
            if t_logits.shape != s_logits.shape:
                raise ValueError(f"student logits {tuple(s_logits.shape)} and teacher logits "
                                 f"{tuple(t_logits.shape)} differ in shape (different class counts?)")

        if self.ce_weight > 0:
            add("ce", self.ce_weight, F.cross_entropy(s_logits.float(), y, label_smoothing=self.label_smoothing))
        if self.kd_weight > 0:
            kept = t_logits.argmax(1) == y if self.kd_samples == "teacher-correct" else None
            add("kd", self.kd_weight, kd_loss(s_logits, t_logits, self.kd_temperature, kept))
        if self.feat_weight > 0:
            add("feat", self.feat_weight, self._feature_term(s_logits.shape[0]))
        if self.jac_weight > 0:
            add("jac", self.jac_weight, jac)
        if total is None:  # every weight 0: a zero loss that still connects to the student's graph
            total = s_logits.float().sum() * 0.0
        terms["total"] = total.detach()
        return total, terms

    def _clean_passes(self, x, y, seed, teacher_logits):
        """(student logits at x, teacher logits at x (`teacher_logits` when given), the Jacobian term or None),
        features recorded at x."""
        student, teacher = self._models
        s_capture, t_capture = self._captures
        if self.feature_pairs:
            # the first n rows: in the batched Jacobian call (a student sharing clean statistics) the rest are
            # the perturbed ones
            s_capture.arm(rows=slice(0, x.shape[0]))
            t_capture.arm()
        jac, t_logits = None, teacher_logits
        try:
            if self.jac_weight > 0:
                # One call makes the clean forwards of both models (recorded by the hooks) and the perturbed
                # ones; the clean logits it returns serve the other terms.
                generator = None if seed is None else seeding.generator(seeding.derive_seed(seed, "jacobian"), x.device)
                jac, s_logits, t_logits = jacobian_penalty(student, x, y, teacher=teacher, reduction="mean",
                                                           return_outputs=True, generator=generator, **self.jacobian)
            else:
                s_logits = student(x)
                if self.uses_teacher and t_logits is None:
                    t_logits = self.teacher_logits(x)
        finally:
            s_capture.armed = t_capture.armed = False
        return s_logits, t_logits, jac

    def _adversarial_passes(self, x, y, seed, teacher_logits):
        """(student logits at x', teacher logits at x' (at x with teacher_at "clean"; `teacher_logits` when given),
        the Jacobian term or None); the features recorded at the same inputs."""
        from .attacks import n_fgsm, pgd

        student, teacher = self._models
        h = self.jacobian["h"]
        if self.steps == 1:
            start, x_adv = n_fgsm(student, x, y, self.eps, alpha=h, noise=self.noise * self.eps, seed=seed,
                                  return_start=True)
        else:  # no start to difference from: the Jacobian term is off (checked in __init__)
            start, x_adv = None, pgd(student, x, y, self.eps, self.alpha, self.steps, norm="linf", random_start=True,
                                     seed=seed)
        s_capture, t_capture = self._captures
        jac = None
        try:
            if self.jac_weight > 0 and shares_clean_statistics(student):
                # one batched call (a compiled student): rows [0, n) are x̃, the rest x' (rkd_fast.clean_pass)
                n = x.shape[0]
                if self.feature_pairs:
                    s_capture.arm(rows=slice(n, None))
                with clean_rows(student, n):
                    out = student(torch.cat([start, x_adv]))
                s_start, s_logits = out[:n], out[n:]
            elif self.jac_weight > 0:
                # S(x̃) is an ordinary train-mode forward (it alone updates BatchNorm's running statistics); S(x')
                # reuses its batch statistics and dropout masks, so the difference is the function's change.
                state = CleanPassState(student)
                with state.record():
                    s_start = student(start)
                if self.feature_pairs:
                    s_capture.arm()
                with state.replay():
                    s_logits = student(x_adv)
            else:
                if self.feature_pairs:
                    s_capture.arm()
                s_logits = student(x_adv)
            t_logits, t_adv, t_start = teacher_logits, None, None
            if self.uses_teacher and t_logits is None:
                n = x.shape[0]
                # one call (the teacher is frozen): the targets' input first (its features recorded), then x' and
                # x̃ where the Jacobian term needs them
                inputs = [x] if self.teacher_at == "clean" else []
                if self.teacher_at == "student" or self.jac_weight > 0:
                    inputs.append(x_adv)
                if self.jac_weight > 0:
                    inputs.append(start)
                if self.feature_pairs:
                    t_capture.arm(rows=slice(0, n))
                with torch.no_grad():
                    t_out = self._teach(torch.cat(inputs) if len(inputs) > 1 else inputs[0])
                t_logits = t_out[:n]
                if self.jac_weight > 0:
                    t_adv, t_start = t_out[-2 * n:-n], t_out[-n:]
        finally:
            s_capture.armed = t_capture.armed = False
        if self.jac_weight > 0:
            jac = fd_jacobian_loss(s_start, s_logits, h, t_clean=t_start, t_pert=t_adv, on=self.jacobian["on"],
                                   temperature=self.jacobian["temperature"], reduction="mean")
        return s_logits, t_logits, jac

    def _feature_term(self, batch):
        s_feats, t_feats = self._captures[0].features, self._captures[1].features
        losses = []
        for (s_name, t_name), adapter, s_feat, t_feat in zip(self.feature_pairs, self.adapters, s_feats, t_feats):
            if s_feat is None or t_feat is None:
                raise RuntimeError(f"feature pair ({s_name!r}, {t_name!r}) was not recorded in the forward the "
                                   "terms are evaluated at")
            if s_feat.shape[0] != batch or t_feat.shape[0] != batch:
                raise RuntimeError(f"feature pair ({s_name!r}, {t_name!r}): recorded batch sizes "
                                   f"{s_feat.shape[0]}, {t_feat.shape[0]} differ from the input's {batch}")
            losses.append(feature_distance(adapter(s_feat), t_feat.detach(), mode=self.feature_mode))
        for capture in self._captures:  # drop the references so the activations can be freed
            capture.features = [None] * len(capture.features)
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def extra_repr(self):
        return (f"ce_weight={self.ce_weight}, kd_weight={self.kd_weight}, kd_temperature={self.kd_temperature}, "
                f"kd_samples={self.kd_samples!r}, "
                f"feat_weight={self.feat_weight}, jac_weight={self.jac_weight}, feature_mode={self.feature_mode!r}, "
                f"feature_pairs={self.feature_pairs}, jacobian={self.jacobian}, teacher_at={self.teacher_at!r}"
                + (f", eps={self.eps}, steps={self.steps}" if self.eps is not None else ""))


def kd_loss(student_logits, teacher_logits, temperature, kept=None):
    """Hinton et al.'s distillation term: T² · KL(softmax(t/T) ‖ softmax(s/T)), batch mean, in float32; with
    `kept` (a boolean mask of the batch), the samples outside it count 0."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    if kept is None:
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)
    per_sample = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)
    return (per_sample * kept).sum() / kept.shape[0] * (t * t)


def _record_hook(capture, index, prefix=0, nhwc=False):
    def hook(module, inputs, output):
        if capture.armed:
            if not isinstance(output, torch.Tensor):  # refused by _inspect, with the layer's name
                capture.features[index] = output
                return
            rows = capture.rows
            output = as_feature_map(output, prefix, nhwc)  # token sequences (N, L, C), NHWC maps as NCHW maps
            capture.features[index] = output if rows == slice(None) else output[rows]
    return hook


def _disarm_hook(capture):
    def hook(module, inputs, output):
        capture.armed = False
    return hook
