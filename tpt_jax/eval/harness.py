"""lm-eval tasks on local files: the task yamls `tpt eval` writes, and the harness run.

A task of kind "lm_eval" names a task lm-eval knows (its own, or ours under tpt_jax/eval/tasks)
and the local files it reads; `local_task_yaml` writes a yaml that includes that task's yaml and
replaces only where its data come from (and, when set, its shots and generation cap), so
prompts, few-shot exemplars, filters and metrics stay lm-eval's. Nothing is downloaded.
"""

from __future__ import annotations

import os

import yaml

TASKS_DIR = os.path.join(os.path.dirname(__file__), "tasks")  # our own task yamls


def task_manager(include_dirs: list[str]):
    """lm-eval's task registry, with our task yamls and `include_dirs` added."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[TASKS_DIR, *include_dirs])


def base_yaml(manager, task: str) -> str:
    """The yaml file that defines lm-eval task `task`.

    Raises:
        KeyError: lm-eval knows no task of that name (or it is a group, not a task).
    """
    entry = manager.task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise KeyError(task)
    return str(entry.yaml_path)


def local_task_yaml(spec, manager) -> dict:
    """The yaml (as a dict) of `spec` (an EvalTaskConfig of kind "lm_eval"): lm-eval task
    `spec.task` reading `spec.path` (test split) and `spec.fewshot_path` (its few-shot split,
    when the task draws exemplars from one)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = base_yaml(manager, spec.task)
    base = load_yaml(path, resolve_func=False)
    files = {"test": spec.path}
    out = {
        "include": path,
        "task": spec.name,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "test_split": "test",
        "validation_split": None,
        "training_split": None,
    }
    if spec.fewshot_path:
        files["fewshot"] = spec.fewshot_path
        out["fewshot_split"] = "fewshot"
    elif not (base.get("fewshot_config") or {}).get("samples"):
        out["fewshot_split"] = None  # exemplars only where the task writes them out
    out["dataset_kwargs"] = {"data_files": files}
    if spec.shots >= 0:
        out["num_fewshot"] = spec.shots
    if base.get("output_type") == "generate_until" and spec.max_new_tokens:
        out["generation_kwargs"] = {**base.get("generation_kwargs", {}),
                                    "max_gen_toks": spec.max_new_tokens}  # fmt: skip
    return out


def write_task_yamls(specs, folder: str, manager) -> None:
    """One `<name>.yaml` per spec in `folder` (then a TaskManager including it finds them)."""
    os.makedirs(folder, exist_ok=True)
    for spec in specs:
        with open(os.path.join(folder, f"{spec.name}.yaml"), "w") as f:
            yaml.safe_dump(local_task_yaml(spec, manager), f, sort_keys=False)


def evaluate(lm, specs, work_dir: str, limit: int = 0) -> dict:
    """lm_eval.simple_evaluate of the tasks `specs` describe on `lm` (an lm-eval LM).

    Returns lm-eval's results dict (results, configs, n-shot, samples, ...)."""
    import lm_eval

    folder = os.path.join(work_dir, "lm_eval_tasks")
    write_task_yamls(specs, folder, task_manager([]))
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[s.name for s in specs],
        task_manager=task_manager([folder]),
        limit=limit or None,
        log_samples=True,
        bootstrap_iters=0,
    )
