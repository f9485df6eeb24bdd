"""Checks that need more than one field, or the device count. Pure: they only raise ConfigError."""

from __future__ import annotations

import math

from tpt_jax.config import _schema as schema
from tpt_jax.errors import ConfigError

MESH_AXES = ("dcn_data", "dcn_fsdp", "data", "fsdp", "tensor")


# Chat-template variables the prompt builder passes itself (tpt_jax/generate/_chat_template.py).
RENDERER_VARIABLES = ("messages", "tools", "documents", "add_generation_prompt")


def _fail(cfg: schema.Config, key: str, message: str) -> None:
    raise ConfigError(f"config key '{key}': {message} ({cfg.source_of(key)})")


def _choice(cfg: schema.Config, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(cfg, key, f"{value!r} is not one of {', '.join(allowed)}")


def _positive(cfg: schema.Config, key: str, value: float, allow_zero: bool = False) -> None:
    # nan passes every comparison and inf is no usable rate, size or limit: refuse both.
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        _fail(cfg, key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: schema.Config) -> None:
    """Static checks: everything that can be known without devices."""
    m = cfg.model
    _choice(cfg, "model.family", m.family, schema.FAMILIES)
    _choice(cfg, "model.dtype", m.dtype, schema.DTYPES)
    _choice(cfg, "model.param_dtype", m.param_dtype, schema.DTYPES)
    _choice(cfg, "model.remat_policy", m.remat_policy, schema.REMAT_POLICIES)
    _choice(cfg, "model.rope_scaling", m.rope_scaling, schema.ROPE_SCALING_TYPES)
    _choice(cfg, "model.attention", m.attention, schema.ATTENTION_KINDS)
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
        _positive(cfg, f"model.{key}", getattr(m, key))
    _positive(cfg, "model.head_dim", m.head_dim, allow_zero=True)
    _positive(cfg, "model.attention_block", m.attention_block, allow_zero=True)
    _positive(cfg, "model.scan_unroll", m.scan_unroll)
    for key in ("splash_block_q", "splash_block_kv", "splash_block_kv_compute"):
        if getattr(m, key) <= 0 or getattr(m, key) % 128:
            _fail(cfg, f"model.{key}", f"must be a positive multiple of 128, got {getattr(m, key)}")
    _positive(cfg, "model.loss_chunk", m.loss_chunk, allow_zero=True)
    if m.splash_block_kv % m.splash_block_kv_compute:
        _fail(
            cfg,
            "model.splash_block_kv_compute",
            f"must divide model.splash_block_kv={m.splash_block_kv}, got {m.splash_block_kv_compute}",
        )
    _positive(cfg, "model.rms_norm_eps", m.rms_norm_eps)
    _positive(cfg, "model.rope_theta", m.rope_theta)
    if m.num_heads % m.num_kv_heads:
        _fail(
            cfg,
            "model.num_kv_heads",
            f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}",
        )
    if not m.head_dim and m.hidden_size % m.num_heads:
        _fail(
            cfg,
            "model.num_heads",
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; "
            "set model.head_dim explicitly",
        )
    if m.resolved_head_dim % 2:
        _fail(
            cfg, "model.head_dim", f"RoPE needs an even head dimension, got {m.resolved_head_dim}"
        )
    if m.rope_scaling != "none":
        _positive(cfg, "model.rope_factor", m.rope_factor)
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        _fail(
            cfg,
            "model.rope_high_freq_factor",
            "must be greater than model.rope_low_freq_factor for llama3 scaling",
        )

    for axis in MESH_AXES:
        size = getattr(cfg.mesh, axis)
        if size == 0 or size < -1:
            _fail(cfg, f"mesh.{axis}", f"must be a positive size or -1 (fill), got {size}")
    if sum(getattr(cfg.mesh, a) == -1 for a in MESH_AXES) > 1:
        _fail(cfg, "mesh", "at most one mesh axis may be -1")
    for rule in cfg.mesh.rules:
        if not (isinstance(rule, list | tuple) and len(rule) == 2 and isinstance(rule[0], str)):
            _fail(
                cfg,
                "mesh.rules",
                f"each rule is [logical_name, mesh_axis or list or null], got {rule!r}",
            )
        if rule[0] == "activation_embed" and rule[1]:
            _fail(
                cfg,
                "mesh.rules",
                "activation_embed must stay null: with the residual stream's width split over a "
                "mesh axis, XLA's partitioner computes wrong values inside loops (see "
                "tpt_jax/parallel/_rules.py)",
            )

    t = cfg.train
    for key in ("steps", "global_batch", "seq_len"):
        _positive(cfg, f"train.{key}", getattr(t, key))
    _positive(cfg, "train.eval_every", t.eval_every, allow_zero=True)
    _positive(cfg, "train.eval_batches", t.eval_batches)
    _positive(cfg, "train.max_steps_per_run", t.max_steps_per_run, allow_zero=True)

    o = cfg.optimizer
    _positive(cfg, "optimizer.grad_accum_steps", o.grad_accum_steps)
    _positive(cfg, "optimizer.grad_clip", o.grad_clip, allow_zero=True)
    _positive(cfg, "optimizer.weight_decay", o.weight_decay, allow_zero=True)
    _positive(cfg, "optimizer.eps", o.eps, allow_zero=True)
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        _fail(cfg, "optimizer.b1", f"Adam betas must lie in [0, 1), got b1={o.b1}, b2={o.b2}")
    if t.global_batch % o.grad_accum_steps:
        _fail(
            cfg,
            "optimizer.grad_accum_steps",
            f"train.global_batch={t.global_batch} is not divisible by {o.grad_accum_steps} micro-batches",
        )

    s = cfg.schedule
    _choice(cfg, "schedule.kind", s.kind, schema.SCHEDULES)
    _positive(cfg, "schedule.peak_lr", s.peak_lr)
    _positive(cfg, "schedule.warmup_steps", s.warmup_steps, allow_zero=True)
    _positive(cfg, "schedule.decay_steps", s.decay_steps, allow_zero=True)
    if not 0 <= s.final_lr_ratio <= 1:
        _fail(cfg, "schedule.final_lr_ratio", f"must lie in [0, 1], got {s.final_lr_ratio}")
    if s.kind != "constant" and s.warmup_steps + s.decay_steps > t.steps:
        _fail(
            cfg,
            "schedule.decay_steps" if s.decay_steps else "schedule.warmup_steps",
            f"warmup_steps + decay_steps = {s.warmup_steps + s.decay_steps} exceeds train.steps={t.steps}",
        )

    c = cfg.checkpoint
    _positive(cfg, "checkpoint.save_every", c.save_every)
    _positive(cfg, "checkpoint.keep", c.keep)

    _validate_data(cfg)

    _positive(cfg, "logging.log_every", cfg.logging.log_every)

    th = cfg.think
    _choice(cfg, "think.on_length", th.on_length, ("keep", "drop", "truncate"))
    _choice(cfg, "think.backend", th.backend, ("local", "jetstream", "openai", "teacher"))
    if th.dtype:
        _choice(cfg, "think.dtype", th.dtype, schema.DTYPES)
    _positive(cfg, "think.concurrency", th.concurrency)
    _positive(cfg, "think.timeout_s", th.timeout_s)
    _positive(cfg, "think.retries", th.retries, allow_zero=True)
    _positive(cfg, "think.preemption_grace_s", th.preemption_grace_s, allow_zero=True)
    for key in (
        "max_document_tokens",
        "max_new_tokens",
        "chunk_size",
        "max_concurrent_decodes",
        "page_size",
        "prefill_chunk",
    ):
        _positive(cfg, f"think.{key}", getattr(th, key))
    _positive(cfg, "think.kv_cache_tokens", th.kv_cache_tokens, allow_zero=True)
    if th.prefill_chunk % th.page_size:
        _fail(
            cfg,
            "think.prefill_chunk",
            f"must be a multiple of think.page_size ({th.page_size}), got {th.prefill_chunk}",
        )
    _positive(cfg, "think.temperature", th.temperature, allow_zero=True)
    if not 0 < th.top_p <= 1:
        _fail(cfg, "think.top_p", f"must lie in (0, 1], got {th.top_p}")
    for name in th.chat_template_kwargs:
        # The prompt-building code sets these itself (one user turn, the assistant turn opened).
        if not isinstance(name, str) or name in RENDERER_VARIABLES:
            _fail(
                cfg,
                f"think.chat_template_kwargs.{name}",
                f"the prompt builder sets it; name template variables other than "
                f"{', '.join(RENDERER_VARIABLES)}",
            )

    if cfg.mesh.topology:
        try:
            topology_chips(cfg.mesh.topology)
        except ValueError as e:
            _fail(cfg, "mesh.topology", str(e))

    _positive(cfg, "eval.batch_size", cfg.eval.batch_size)
    _positive(cfg, "eval.limit", cfg.eval.limit, allow_zero=True)
    _positive(cfg, "train.eval_tasks_every", t.eval_tasks_every, allow_zero=True)
    if t.eval_tasks:
        if not (t.eval_tasks_every or t.eval_every):
            _fail(cfg, "train.eval_tasks_every", "set how often train.eval_tasks run (steps)")
        if not cfg.data.vocab_path:
            _fail(cfg, "train.eval_tasks", "needs data.vocab_path: the tokenizer of the prompts")
    for i, task in enumerate(t.eval_tasks):
        if task.kind != "lm_eval":
            _fail(cfg, f"train.eval_tasks[{i}].kind", "training runs lm-eval tasks only: lm_eval")
    tasks = [(f"eval.tasks[{i}]", task) for i, task in enumerate(cfg.eval.tasks)]
    tasks += [(f"train.eval_tasks[{i}]", task) for i, task in enumerate(t.eval_tasks)]
    for key, task in tasks:
        _choice(cfg, f"{key}.kind", task.kind, ("lm_eval", "perplexity", "answer", "think_first"))
        if not task.name or not task.path:
            _fail(cfg, key, "every eval task needs a name and a path")
        if task.kind == "lm_eval" and not task.task:
            _fail(cfg, f"{key}.task", "name the lm-eval task to run (e.g. gsm8k_cot)")
        _positive(cfg, f"{key}.max_new_tokens", task.max_new_tokens, allow_zero=True)
        if task.shots < -1:
            _fail(cfg, f"{key}.shots", "must be -1 (the task's own) or a count")


def task_names(data: schema.DataConfig) -> list[str]:
    """The SeqIO task names the corpora define: <name>_vanilla, and <name>_tpt with thinking."""
    names = []
    for corpus in data.corpora:
        names.append(f"{corpus.name}_vanilla")
        if corpus.thinking_field:
            names.append(f"{corpus.name}_tpt")
    return names


def _validate_data(cfg: schema.Config) -> None:
    d = cfg.data
    _choice(cfg, "data.source", d.source, ("synthetic", "prepared"))
    _choice(cfg, "data.long_docs", d.long_docs, ("split", "truncate"))
    if not 0 <= d.heldout_fraction < 1:  # also refuses nan
        _fail(cfg, "data.heldout_fraction", f"must be >= 0 and < 1, got {d.heldout_fraction}")
    for field in ("{text}", "{thinking}"):
        if field not in d.tpt_template:
            _fail(cfg, "data.tpt_template", f"must contain {field}")
    seen = set()
    for i, corpus in enumerate(d.corpora):
        key = f"data.corpora[{i}]"
        if not corpus.name or not corpus.name.replace("_", "").replace("-", "").isalnum():
            _fail(
                cfg,
                f"{key}.name",
                f"must be a non-empty name of letters, digits, _ or -, got {corpus.name!r}",
            )
        if corpus.name in seen:
            _fail(cfg, f"{key}.name", f"corpus name {corpus.name!r} is used twice")
        seen.add(corpus.name)
        if not corpus.paths:
            _fail(cfg, f"{key}.paths", "lists no files")
    tasks = task_names(d)
    for i, component in enumerate(d.mixture):
        key = f"data.mixture[{i}]"
        if component.task not in tasks:
            known = ", ".join(tasks) or "none: data.corpora is empty"
            _fail(cfg, f"{key}.task", f"unknown task {component.task!r} (tasks: {known})")
        _positive(cfg, f"{key}.rate", component.rate)
    if d.source == "prepared":
        if not d.prepared_dir:
            _fail(
                cfg, "data.prepared_dir", "data.source=prepared needs the folder of prepared shards"
            )
        if not d.mixture:
            _fail(cfg, "data.mixture", "data.source=prepared needs at least one mixture component")


def mesh_shape(cfg: schema.Config, num_devices: int) -> dict[str, int]:
    """Resolves -1 and checks the mesh against the device count.

    Returns:
        axis name -> size for every axis of MESH_AXES; the product equals num_devices.
    """
    sizes = {a: getattr(cfg.mesh, a) for a in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    fill = [a for a, v in sizes.items() if v == -1]
    if fill:
        if num_devices % fixed:
            _fail(
                cfg,
                f"mesh.{fill[0]}",
                f"the other mesh axes multiply to {fixed}, which does not divide the {num_devices} devices",
            )
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        shape = " x ".join(f"{a}={v}" for a, v in sizes.items() if v != 1) or "1"
        _fail(cfg, "mesh", f"mesh {shape} has {fixed} devices but {num_devices} are available")
    return sizes


# TensorCores per chip in gcloud accelerator-type names (v4 and v5p count cores, v5e/v6e chips).
_CORES_PER_CHIP = {"v2": 2, "v3": 2, "v4": 2, "v5p": 2, "v5litepod": 1, "v5e": 1, "v6e": 1}


def topology_chips(topology: str) -> int:
    """Chips of one slice of a gcloud TPU accelerator type: v5p-128 -> 64, v6e-8 -> 8."""
    family, _, count = topology.rpartition("-")
    if family not in _CORES_PER_CHIP or not count.isdigit():
        known = ", ".join(sorted(_CORES_PER_CHIP))
        raise ValueError(f"{topology!r} is not a TPU accelerator type (<{known}>-<size>)")
    return max(1, int(count) // _CORES_PER_CHIP[family])


def validate_for_devices(
    cfg: schema.Config, num_devices: int, training: bool = True
) -> dict[str, int]:
    """Checks that need the device count; returns the resolved mesh shape. With `training`,
    also that the training batch splits over the data-parallel devices (commands that only
    generate or evaluate never read it)."""
    sizes = mesh_shape(cfg, num_devices)
    dp = sizes["dcn_data"] * sizes["dcn_fsdp"] * sizes["data"] * sizes["fsdp"]
    micro = cfg.train.global_batch // cfg.optimizer.grad_accum_steps
    if training and micro % dp:
        _fail(
            cfg,
            "train.global_batch",
            f"global batch {cfg.train.global_batch} ({micro} per micro-batch) is not divisible "
            f"by the data-parallel size {dp} (data x fsdp over {num_devices} devices)",
        )
    return sizes
