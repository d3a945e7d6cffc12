"""The training methods: one module each in this package, each registering its class (rkd_fast.train.methods.base
says what a method declares). Every module here is imported, so a new method's module is all there is to add."""

import importlib
import pkgutil

from .base import (METHODS, Method, RunSettings, all_options, baseline_methods, build_method, create,
                   default_study_variants, method_defaults, on_change, register, resolve_options, study_variants,
                   teacher_methods, unregister)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "RunSettings", "all_options", "baseline_methods", "build_method", "create",
           "default_study_variants", "method_defaults", "on_change", "register", "resolve_options", "study_variants",
           "teacher_methods", "unregister"]
