"""Multi-host start-up: `jax.distributed.initialize` from flags, the environment, or by itself.

- Flags (`--coordinator HOST:PORT --num-processes N --process-id I`) or the same in the
  environment (TPT_COORDINATOR_ADDRESS, TPT_NUM_PROCESSES, TPT_PROCESS_ID): any cluster, or
  several processes on one machine (CPU collectives then go over gloo).
- On a Cloud TPU VM slice with several hosts, or multi-slice, JAX finds its peers itself.
- Otherwise one process: nothing to do.
"""

from __future__ import annotations

import os

from tpt_jax.errors import TptError

_ENV = ("TPT_COORDINATOR_ADDRESS", "TPT_NUM_PROCESSES", "TPT_PROCESS_ID")


def _tpu_multihost() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts multi-process JAX when asked to or on a multi-host TPU; returns whether it did."""
    import jax

    coordinator = coordinator or os.environ.get(_ENV[0])
    if num_processes is None and os.environ.get(_ENV[1]):
        num_processes = int(os.environ[_ENV[1]])
    if process_id is None and os.environ.get(_ENV[2]):
        process_id = int(os.environ[_ENV[2]])
    if coordinator:
        if num_processes is None or process_id is None:
            raise TptError(
                "--coordinator needs --num-processes and --process-id "
                f"(or {_ENV[1]} and {_ENV[2]} in the environment)"
            )
        if not 0 <= process_id < num_processes:
            raise TptError(f"--process-id {process_id} is not in [0, {num_processes})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
        return True
    if _tpu_multihost():
        jax.distributed.initialize()
        return True
    return False


def add_arguments(parser) -> None:
    group = parser.add_argument_group("multi-process (default: one process, or a TPU pod's own)")
    group.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)
