"""Orbax checkpoints of a run: state (params, optimizer, step) + meta (data position, config).

One CheckpointManager per run folder, `<output_dir>/<run_name>/checkpoints/<step>/{state,meta}`.
Saves are asynchronous (training continues while the previous one is written), the last `keep`
are kept, and a restore goes onto whatever shardings the caller asks for, so a run saved on 8
devices resumes on 4.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from tpt_jax.config import CheckpointConfig
from tpt_jax.errors import CheckpointError
from tpt_jax.model._store import check_shapes


class RunCheckpoints:
    def __init__(self, run_dir: str, cfg: CheckpointConfig):
        directory = os.path.join(run_dir, "checkpoints")
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True
        )
        # Handlers named up front so that a fresh process can read metadata before restoring.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restores `step` onto abstract_state's shardings; refuses a checkpoint of other shapes."""
        where = os.path.join(self.directory, str(step))
        saved = self._manager.item_metadata(step)["state"]
        tree = getattr(saved, "tree", saved)
        if tree is None or "params" not in tree:
            raise CheckpointError(f"{where}: no train state in this checkpoint")
        check_shapes(tree["params"], abstract_state.params, where)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
