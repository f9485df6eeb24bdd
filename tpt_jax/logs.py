"""Quiet defaults for the libraries' own logging, set at the CLI edge; `tpt --verbose` keeps it.

Without them a `tpt` command shows what its libraries print for their developers:
- JetStream's orchestrator, when imported, sets the root logger to DEBUG with a handler on
  stdout, so `tpt serve` printed every JAX compile step (~700 lines at start-up).
- TensorFlow (under SeqIO, in `tpt prepare` and `tpt serve`) prints its CUDA, cuDNN and oneDNN
  start-up lines from C++ while it is imported, before TF_CPP_MIN_LOG_LEVEL is read, and a
  failed cuInit later on a machine without a GPU.

Quiet: library records below WARNING are dropped, TensorFlow's C++ logs are off, and the native
start-up output of a heavy import is held back (and shown if the import fails). Verbose: every
record from DEBUG up goes to stderr, and nothing is held back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (pytest and Beam replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # logging.StreamHandler.__init__ assigns one; we never keep it
        pass


_VERBOSE_HANDLER = _StderrHandler()
_VERBOSE_HANDLER.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))


# The user's own setting, read before `import jax` replaces an unset one with its default ("1").
# (In a process that imported JAX before tpt_jax.cli, a test, JAX's "1" counts as the user's.)
_USER_TF_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")


def set_native_defaults(verbose: bool) -> None:
    """Environment read by native libraries when they load: call before importing them."""
    if _USER_TF_LEVEL is not None:
        return
    # 3: TensorFlow's C++ logs only show FATAL; its INFO/WARNING/ERROR lines here are the GPU
    # probes of a machine without one (cuInit, cuDNN, TF-TRT), not prepare's errors, which
    # reach Python as exceptions. TensorFlow reads the level when it loads, after JAX.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else "3"
    if not verbose:
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def settle(verbose: bool) -> None:
    """Python logging as tpt wants it; call again after importing a library that changes it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        # JetStream's orchestrator adds a DEBUG handler on stdout, where tpt's own results go.
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            root.removeHandler(handler)
    if verbose:
        if _VERBOSE_HANDLER not in root.handlers:
            root.addHandler(_VERBOSE_HANDLER)
        root.setLevel(logging.DEBUG)
    else:
        root.setLevel(logging.WARNING)


@contextlib.contextmanager
def native_output_held(verbose: bool) -> Iterator[None]:
    """Holds back what is written to file descriptor 2 inside (a C++ library's start-up lines).

    If the block raises, the held output is written out first, since it may say why; not for a
    module that is not installed, which the caller reports on one line.
    """
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except ModuleNotFoundError:
            raise
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
