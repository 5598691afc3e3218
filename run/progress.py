"""Feedback on long passes: a tqdm bar on a terminal, a few plain lines in logs.

Every pass over data that can take more than a few seconds (training epochs, validation, test-mode
evaluation, the iteration sweep) reports through `progress(...)`. On a terminal that is a tqdm bar;
with `quiet` or when stderr is not a terminal (a background run writing a log file) it is a plain line
every tenth of the pass, so logs stay readable.
"""

import contextlib
import os
import sys
import time

from tqdm import tqdm

PLAIN_LINES = 10  # plain mode: a line after the first unit, then one per tenth of the pass


class PlainProgress:
    """The part of tqdm's interface the passes use, printing a line at every tenth of the pass."""

    def __init__(self, total, desc, unit, initial=0, stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.postfix = {}
        self._started, self._start_n = time.time(), initial
        self._next_line = initial + 1  # a first line after the first unit: the pass is under way

    def _line_after(self, n):
        """The count at which the next line is due: the next multiple of a tenth of the total above n."""
        step = max(1, -(-self.total // PLAIN_LINES))
        return min(self.total, (n // step + 1) * step)

    def set_postfix(self, **values):
        self.postfix = values

    def update(self, n=1):
        self.n += n
        if self.n >= self._next_line:
            self._print()
            self._next_line = self._line_after(self.n)

    def _print(self):
        elapsed = max(time.time() - self._started, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        extra = "".join(", %s=%s" % (name, value) for name, value in self.postfix.items())
        percent = 100.0 * self.n / max(self.total, 1)
        print(
            "%s: %3.0f%% (%d/%d %s, %.1f %s/s%s)"
            % (self.desc, percent, self.n, self.total, self.unit, rate, self.unit, extra),
            file=self.stream,
            flush=True,
        )

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


def plain_output(quiet):
    """Whether passes print plain lines: asked for (`quiet`), or stderr is not a terminal."""
    return quiet or not sys.stderr.isatty()


def progress(total, desc, unit, quiet=False, initial=0):
    """A progress reporter over `total` units: a tqdm bar, or `PlainProgress` when `plain_output(quiet)`."""
    if plain_output(quiet):
        return PlainProgress(total, desc, unit, initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)


def write(message):
    """Prints a line without breaking a bar in progress."""
    tqdm.write(message)


@contextlib.contextmanager
def quiet_native_stderr():
    """Sends file descriptor 2 to /dev/null for a while: TensorFlow's C++ start-up lines (CUDA probing, oneDNN
    notice) come before its logging is set up and ignore TF_CPP_MIN_LOG_LEVEL; without this, every one-line error
    would come with four lines of noise."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
