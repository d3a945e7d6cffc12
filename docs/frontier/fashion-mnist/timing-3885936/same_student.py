"""After epochs.sh: robust-kd with Fashion-MNIST's defaults trained with the teacher cache (runs/timing-c/robust-kd)
and without it (runs/timing-c/robust-kd-no-cache) end with the same student, bit for bit, and the same history."""

import torch

from rkd_fast.train import checkpoints

cached, plain = (checkpoints.load_latest(f"runs/timing-c/{name}")[0] for name in ("robust-kd", "robust-kd-no-cache"))
same = all(torch.equal(cached["student"][k], plain["student"][k]) for k in plain["student"])


def untimed(state):
    return [{k: v for k, v in row.items() if "seconds" not in k and k != "images_per_s"} for row in state["history"]]


print(f"steps {cached['position']['global_step']} and {plain['position']['global_step']}; the same student bit for "
      f"bit: {same}; the same history: {untimed(cached) == untimed(plain)}")
