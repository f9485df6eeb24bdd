"""The optional parts of the install (pip extras) and the commands that need them.

The base install is what a training worker needs (JAX, Flax, Optax, Orbax, Grain: no
TensorFlow). `tpt prepare` (and `tpt demo`, which runs it) needs the 'prepare' extra: SeqIO,
TensorFlow, Apache Beam. `tpt serve` and think.backend=jetstream need the 'serve' extra:
JetStream and gRPC. A command checks for its extra before its work starts, so a missing one is
one line naming the extra to install, not an ImportError deep inside a pipeline.
"""

from __future__ import annotations

import importlib

from tpt_jax import logs
from tpt_jax.errors import MissingExtraError

# What each extra's users import first; importing them is the check (and loads them once, with
# their native start-up output held back).
MODULES = {
    "prepare": ("tensorflow", "seqio", "apache_beam"),
    "serve": ("grpc", "jetstream.core.orchestrator"),
}
# think.backend=jetstream is a client: the gRPC stubs, without the orchestrator (or TensorFlow).
JETSTREAM_CLIENT = ("grpc", "jetstream.core.proto.jetstream_pb2_grpc")


def load(
    extra: str, user: str, verbose: bool = False, modules: tuple[str, ...] | None = None
) -> None:
    """Imports `modules` (default: all of MODULES[extra]) for `user` (a command, as the user
    typed it, or a config setting).

    Raises:
        MissingExtraError: a module of the extra is not installed.
    """
    for module in modules or MODULES[extra]:
        try:
            with logs.native_output_held(verbose):
                importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise MissingExtraError(user, extra, e.name) from None
    logs.settle(verbose)  # JetStream's orchestrator sets the root logger to DEBUG on import
