"""tests/test_feature_distance.py's tests of the public function and of the kernels, over the Triton kernel on CPU
tensors under the interpreter. A module of its own because TRITON_INTERPRET=1 must be set before triton is first
imported (tests/triton/conftest.py sets it, `make test-triton` runs this directory in a process of its own); the
tests, their cases and their tolerances are those of that module."""

import test_feature_distance
from _op_backends import interpreter_fixtures

(target, kernel_target, triton_target), tests = interpreter_fixtures("feature_distance", test_feature_distance)
globals().update(tests)
