"""Entry point of the torchrun tests (tests/test_distributed.py): `rkd-fast` with the remaining arguments, after

- registering ``small_cnn_nobn``, the digits CNN without BatchNorm (per-process BatchNorm statistics would
  make N processes differ from one by design, so the equivalence tests use a model without it);
- with ``RKD_TEST_STOP_AFTER=K``: ending the process abruptly (``os._exit``, like a kill) after its K-th
  optimizer step, through a public global optimizer hook (no test code in the library).
"""

import os
import sys

from torch.optim.optimizer import register_optimizer_step_post_hook

from rkd_fast.cli import main
from rkd_fast.models import MODELS, register_model


@register_model("small_cnn_nobn")
def small_cnn_nobn(**kwargs):
    return MODELS["small_cnn"](batchnorm=False, **kwargs)


if os.environ.get("RKD_TEST_STOP_AFTER"):
    stop_after, done = int(os.environ["RKD_TEST_STOP_AFTER"]), [0]

    def _stop(*args):
        done[0] += 1
        if done[0] == stop_after:
            sys.stdout.flush()
            os._exit(3)

    register_optimizer_step_post_hook(_stop)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
