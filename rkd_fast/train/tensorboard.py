"""`rkd-fast train --tensorboard`: each epoch's row of metrics.csv (every loss term, the learning rate, images/s,
validation clean and robust accuracy, seconds) as TensorBoard scalars in RUN_DIR/tensorboard/, x = the epoch
(tags: see `tag`).
``tensorboard --logdir RUN_DIR`` (or the parent of several runs) shows them.

TensorBoard is optional: without the package the option is refused when the run's options are checked, before
anything is written."""

import math
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"
INSTALL = "pip install tensorboard (or 'rkd_fast[tensorboard]')"


def summary_writer_class():
    """torch's SummaryWriter, or ValueError saying how to install what it needs."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard imports it only when a writer is made)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ValueError(f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL}") from error
    return SummaryWriter


def tag(column):
    """The TensorBoard tag of a metrics column: train_kd -> loss/kd, val_clean_acc -> val/clean_acc, train_seconds
    -> time/train_seconds, images_per_s -> throughput/images_per_s, lr -> lr."""
    if column.endswith("_seconds"):
        return f"time/{column}"
    if column == "images_per_s":
        return f"throughput/{column}"
    for prefix, group in (("train_", "loss"), ("val_", "val")):
        if column.startswith(prefix):
            return f"{group}/{column[len(prefix):]}"
    return column


class TensorBoardLog:
    """The run's TensorBoard event files: `log_epoch(row)` after each epoch, `close()` at the end."""

    def __init__(self, run_dir):
        self.writer = summary_writer_class()(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def log_epoch(self, row):
        epoch = int(row["epoch"])
        for column, value in row.items():
            if column != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag(column), value, epoch)
        self.writer.flush()

    def close(self):
        self.writer.close()
