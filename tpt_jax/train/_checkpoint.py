"""Orbax checkpoints of a run: state (params, optimizer, step) + meta (data position, config).

One CheckpointManager per run folder, `<output_dir>/<run_name>/checkpoints/<step>/{state,meta}`.
Saves are asynchronous (training continues while the previous one is written), the last `keep`
are kept, and a restore goes onto whatever shardings the caller asks for, so a run saved on 8
devices resumes on 4.
"""

from __future__ import annotations

import os
import time

import fsspec
import jax
import orbax.checkpoint as ocp

from tpt_jax.config import CheckpointConfig
from tpt_jax.errors import CheckpointError
from tpt_jax.model import check_shapes


class CheckpointUnreadableError(CheckpointError):
    """A checkpoint step's files cannot be read; an older step may still be good."""


def _first_line(error: Exception) -> str:
    # Tensorstore errors carry a whole JSON spec; the first 200 characters say what broke.
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:200]}"


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

    def read_meta(self, step: int) -> dict:
        """The step's metadata (data position, config) alone, before its arrays are restored."""
        where = os.path.join(self.directory, str(step))
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
        except Exception as e:  # orbax/tensorstore raise many types for unreadable files
            raise CheckpointUnreadableError(f"{where}: {_first_line(e)}") from e
        return restored["meta"]

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restores `step` onto abstract_state's shardings; refuses a checkpoint of other shapes.

        Raises CheckpointUnreadableError when the step's files cannot be read (a damaged or
        half-deleted checkpoint), CheckpointError when it does not fit the config.
        """
        where = os.path.join(self.directory, str(step))
        try:
            saved = self._manager.item_metadata(step)["state"]
        except Exception as e:
            raise CheckpointUnreadableError(f"{where}: {_first_line(e)}") from e
        tree = getattr(saved, "tree", saved)
        if tree is None or "params" not in tree:
            raise CheckpointUnreadableError(f"{where}: no train state in this checkpoint")
        check_shapes(tree["params"], abstract_state.params, where)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:
            if "tree structures do not match" in str(e):  # other settings, not damage
                raise CheckpointError(
                    f"{where}: its optimizer state does not fit this config's optimizer "
                    "settings; resume with the run's settings"
                ) from None
            raise CheckpointUnreadableError(f"{where}: {_first_line(e)}") from e
        return restored["state"], restored["meta"]

    def set_aside(self, step: int) -> str:
        """Renames an unreadable step out of Orbax's view (to `<step>.unreadable-<time>`): the
        run saves that step again, and the files stay for a look (or a move back) instead of
        being deleted on what may have been a storage hiccup."""
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.unreadable-{int(time.time())}"
        if jax.process_index() == 0:
            fs, inner = fsspec.core.url_to_fs(src)
            fs.mv(inner, fsspec.core.url_to_fs(dst)[1], recursive=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"tpt set aside {step}")
        self._manager.reload()
        return dst

    def remove_unfinished(self) -> list[str]:
        """Deletes the folders of saves that never finished (a process killed mid-save).

        Orbax writes a step under a temporary name (`<step>.orbax-checkpoint-tmp` locally in
        0.12.8; on GCS a folder without commit_success.txt) and renames it when done, so these
        are never restored, only left to fill the disk. Call it only from the run's trainer: a
        reader of the same folder (eval during training) would delete a save in flight.
        """
        if jax.process_index() != 0:
            return []
        removed = []
        for tmp in ocp.utils.tmp_checkpoints(self.directory):
            path = tmp.get()
            path.rmtree()
            removed.append(path.name)
        return removed

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
