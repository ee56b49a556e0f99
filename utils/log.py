"""What a run shows: TensorBoard curves under <result_dir>/<stage>/tb (rank 0 only), and progress bars."""
import sys

from tqdm import tqdm


class Logger:
    def __init__(self, log_dir, enabled=True):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import
            self.writer = SummaryWriter(log_dir)  # makes the folders

    def scalars(self, prefix, values, step):
        """Log a dict of floats; a list (one value per switch) becomes prefix/key/switch_NN curves."""
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (list, tuple)):
                for j, v in enumerate(value):
                    self.writer.add_scalar(f"{prefix}/{key}/switch_{j + 1:02d}", v, step)
            elif isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def progress(iterable, enabled=True, **kw):
    """A tqdm bar, only when stderr is a terminal: in a log file (nohup, a batch scheduler) every refresh
    would be written as one more fragment. The one-line summaries are printed either way."""
    return tqdm(iterable, leave=False, dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()), **kw)
