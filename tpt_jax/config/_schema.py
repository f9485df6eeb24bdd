"""The typed config schema: one frozen dataclass per section, every field with a default.

A run is described by `Config`. YAML files and `key=value` overrides are checked against these
classes by `tpt_jax.config.load`; a field's type annotation is the type a value must have.

Example:
    cfg = load_config("configs/demo.yaml", ["train.steps=300", "model.num_layers=2"])
    cfg.model.hidden_size
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

# A field holding a file or folder (local or gs://): resolved against the config file that set it
# and derived from run.root when empty (tpt_jax/config/_paths.py).
PATH = {"path": True}

FAMILIES = ("llama", "qwen2", "qwen3")
ROPE_SCALING_TYPES = ("none", "linear", "llama3")
REMAT_POLICIES = (
    "none",
    "full",
    "dots",
    "dots_no_batch",
    "save_qkv_proj",
    "save_dot_except_mlp",
    "save_dot_except_mlp_in",
    "minimal",
    "offload_qkv_proj",
    "offload_dot_except_mlp",
)
ATTENTION_KINDS = ("auto", "xla", "splash", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("constant", "cosine", "wsd")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Decoder architecture. Llama-3, Qwen2 and Qwen3 differ only by flags.

    Attributes:
        family: "llama", "qwen2" (q/k/v bias) or "qwen3" (q/k RMSNorm); sets HF names on export.
        vocab_size: rows of the embedding table.
        hidden_size: model width (d_model).
        num_layers: decoder blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention); must divide num_heads.
        head_dim: per-head width; 0 means hidden_size // num_heads.
        mlp_dim: SwiGLU inner width (HF intermediate_size).
        rms_norm_eps: epsilon inside every RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: "none", "linear" (positions / factor) or "llama3" (Llama-3.1 frequency bands).
        rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_position:
            parameters of the scaling above (HF names without the prefix).
        max_position: longest sequence the positional scheme is meant for (HF max_position_embeddings).
        tie_embeddings: the output projection reuses the embedding table.
        qkv_bias: bias on q/k/v projections (Qwen2).
        qk_norm: RMSNorm on each query/key head before RoPE (Qwen3).
        dtype: compute dtype of activations and matmuls.
        param_dtype: storage dtype of parameters (optimizer master weights).
        remat_policy: what each layer keeps for the backward pass: "none" keeps everything,
            "full" recomputes the whole layer, "dots" keeps matmul outputs, "dots_no_batch" keeps
            matmul outputs without a batch dimension (weights-side products). By name, as
            MaxText users tune them: "save_qkv_proj" (the q/k/v projections),
            "save_dot_except_mlp" (q/k/v, attention output and out projection),
            "save_dot_except_mlp_in" (those and the MLP's down projection), "minimal" (every
            projection), "offload_qkv_proj" / "offload_dot_except_mlp" (the same kept in host
            memory instead of HBM: TPU only).
        attention: training attention kernel. "auto" picks by the devices a train or eval step
            is compiled for: "splash" (Pallas splash attention) on TPU, "cudnn"
            (jax.nn.dot_product_attention) on GPU with a 16-bit dtype, "xla" (blocked einsums)
            otherwise and outside such steps (generation's prefill).
        attention_block: queries per block of the "xla" attention; each block reads only the
            keys up to its end, skipping the masked upper triangle. 0 = one block.
        splash_block_q, splash_block_kv, splash_block_kv_compute: splash attention tiles
            (queries, keys per block, keys per inner step), used in the forward and both backward
            kernels; each is capped at the sequence length.
        splash_fused_bwd: one fused backward kernel for dq, dk and dv instead of two.
        scan_unroll: iterations per loop body of the model's scanned loops (layers, loss
            chunks); a large value unrolls them fully (longer compiles; XLA then schedules
            across iterations, and its cost analysis counts every iteration).
        loss_chunk: tokens per device in one chunk of the output projection and cross-entropy
            (a range of positions of the device's rows): only one chunk's logits exist at a
            time, and the training loss makes its gradient in the same pass. 0 = all at once.
        init_std: standard deviation of the normal initializer of every kernel and embedding.
        bos_token_id, eos_token_id: recorded for HF export; -1 when unknown.
    """

    family: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0
    mlp_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention: str = "auto"
    attention_block: int = 128
    splash_block_q: int = 512
    splash_block_kv: int = 512
    splash_block_kv_compute: int = 512
    splash_fused_bwd: bool = False
    scan_unroll: int = 1
    loss_chunk: int = 4096
    init_std: float = 0.02
    bos_token_id: int = -1
    eos_token_id: int = -1

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh. The product of the ICI axes times the DCN axes must equal the device count.

    Attributes:
        data: pure data parallelism (replicated parameters). -1 takes the devices left over.
        fsdp: data parallelism with parameters and optimizer state sharded (ZeRO-3).
        tensor: tensor (model) parallelism over heads and the MLP width.
        dcn_data, dcn_fsdp: the same axes across slices (multi-slice over the data-center network).
        rules: logical-axis -> mesh-axis rules as [logical_name, mesh_axis or list or null];
            empty uses the built-in defaults of `tpt_jax.parallel`.
        topology: the TPU accelerator type a config is sized for (gcloud's name, e.g. v5p-128,
            v6e-8, v5litepod-16); `tpt config` checks the mesh against its chips times the
            slices (dcn_data x dcn_fsdp).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    rules: list = field(default_factory=list)
    topology: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW with decoupled weight decay and global-norm clipping.

    Attributes:
        b1, b2, eps: Adam moments.
        weight_decay: decoupled decay coefficient (multiplied by the learning rate).
        weight_decay_exclude: substrings of parameter paths that get no decay (norms, biases).
        grad_clip: maximum global gradient norm; 0 disables clipping.
        grad_accum_steps: micro-batches summed per optimizer step.
    """

    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    weight_decay_exclude: list = field(default_factory=lambda: ["norm", "bias"])
    grad_clip: float = 1.0
    grad_accum_steps: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule.

    Attributes:
        kind: "constant" (warmup then flat: the paper's pre-training), "cosine" (warmup then cosine
            decay: its mid-training), or "wsd" (warmup, stable, then linear decay).
        peak_lr: learning rate after warmup.
        warmup_steps: linear warmup from 0 to peak_lr.
        decay_steps: cosine length after warmup, or the wsd decay length; 0 = until train.steps.
        final_lr_ratio: learning rate at the end of the decay, as a fraction of peak_lr.
    """

    kind: str = "constant"
    peak_lr: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int = 0
    final_lr_ratio: float = 0.1


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop.

    Attributes:
        steps: optimizer steps to run.
        global_batch: sequences per step over all devices; divisible by the data-parallel size.
        seq_len: tokens per sequence (packed rows).
        seed: parameter initialisation and anything else random in training.
        eval_every: steps between held-out evaluations; 0 disables.
        eval_batches: batches per held-out evaluation.
        max_steps_per_run: stop this invocation after this many steps (0 = run to `steps`); a
            rerun resumes. For time-limited jobs and resume tests.
        eval_tasks: lm-eval tasks (entries as in eval.tasks, kind "lm_eval") run on the current
            parameters by the same path as `tpt eval`, every eval_tasks_every steps and at the
            last step; scores logged as lm_eval/<task>/<metric> (console, metrics.jsonl,
            TensorBoard). The tokenizer is data.vocab_path's; eval.batch_size and eval.limit apply.
        eval_tasks_every: steps between those evaluations; 0: train.eval_every.
    """

    steps: int = 100
    global_batch: int = 8
    seq_len: int = 128
    seed: int = 0
    eval_every: int = 0
    eval_batches: int = 4
    max_steps_per_run: int = 0
    eval_tasks: list[EvalTaskConfig] = field(default_factory=list)
    eval_tasks_every: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoints. Re-running the same run_name in the same output_dir resumes.

    Attributes:
        output_dir: root folder (local or gs://) holding one folder per run; empty: run.root.
        run_name: name of this run's folder; empty: run.name.
        save_every: steps between saves; the last step is always saved.
        keep: number of most recent checkpoints kept.
        async_save: write checkpoints in the background while training continues.
        init_from: a converted checkpoint (`tpt convert`) to start from with a fresh optimizer.
        allow_config_change: resume although settings that change the run differ from the
            checkpoint's (batch, data, schedule, optimizer, model); recorded in config_changes.jsonl.
    """

    output_dir: str = field(default="", metadata=PATH)
    run_name: str = ""
    save_every: int = 1000
    keep: int = 3
    async_save: bool = True
    init_from: str = field(default="", metadata=PATH)
    allow_config_change: bool = False  # deliberate changes only: a typo would fork the run silently


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """One corpus: files of records with a text field and, for an augmented corpus, thinking.

    Attributes:
        name: task prefix; the tasks are `<name>_vanilla` and, with thinking, `<name>_tpt`.
        paths: files or globs, local or gs://. JSONL (.jsonl, .json, .gz, .zst), Parquet
            (.parquet) or ArrayRecord of JSON records (.array_record, .arrayrecord).
        think_outputs: `tpt think` outputs read as more files of this corpus: an experiment
            name (its <run.root>/<name>/thinking folder) or a folder.
        text_field, thinking_field, id_field: record fields; an empty thinking_field means the
            corpus has no thinking (vanilla task only).
        meta_fields: other fields kept as metadata (such as "domain").
    """

    name: str = ""
    paths: list = field(default_factory=list, metadata=PATH)
    think_outputs: list = field(default_factory=list, metadata=PATH)
    text_field: str = "text"
    thinking_field: str = "thinking"
    id_field: str = "id"
    meta_fields: list = field(default_factory=list)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixtureComponent:
    """A task of the training mixture and its sampling rate (relative, need not sum to 1)."""

    task: str = ""
    rate: float = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Training data: corpora -> SeqIO tasks -> mixture -> packed row shards -> loader.

    Attributes:
        source: "synthetic" (a built-in token stream, for smoke tests) or "prepared".
        corpora: the corpora tasks are made from.
        mixture: tasks and their rates. The paper's source weighting is rates 1 : 0.125;
            a vanilla : TPT ratio is two components of one corpus.
        name: the dataset's name: its vocabulary and prepared rows live in
            <run.root>/data/<name>/, shared by every experiment naming it; empty: run.name.
        vocab_path: SentencePiece model or HF tokenizer.json (local or gs://); empty:
            <run.root>/data/<data.name>/vocab.model.
        tpt_template: how a TPT sample joins a document and its thinking ({text}, {thinking}).
        long_docs: "split" (a sample longer than train.seq_len continues in the next row) or
            "truncate" (keep its first train.seq_len tokens).
        prepared_dir: folder (local or gs://) of packed shards and the manifest; empty:
            <run.root>/data/<data.name>/prepared.
        strict: stop at the first bad input record instead of counting and skipping it.
        seed: global shuffle seed of the loader.
        heldout_fraction: share of each corpus's documents that `prepare` holds out of training
            (chosen by a sha256 of the document id, so one document is held out of the vanilla
            and TPT tasks alike, on every rerun) and packs as each task's held-out split, which
            `train.eval_every` evaluates on; 0 disables. A document without an `id` field gets
            a content id that includes its corpus name (`<corpus>:<sha256 of the text>`), so
            the same raw text under two corpus names is held out (or not) independently. It is part of the prepared data: a
            change needs a new data.prepared_dir. Evaluation reads at most train.eval_batches x
            train.global_batch rows per task, so large corpora want a small share (e.g. 1e-4).
    """

    source: str = "synthetic"
    corpora: list[CorpusConfig] = field(default_factory=list)
    mixture: list[MixtureComponent] = field(default_factory=list)
    name: str = ""
    vocab_path: str = field(default="", metadata=PATH)
    tpt_template: str = "{text}\n<think>\n{thinking}\n</think>"
    long_docs: str = "split"
    prepared_dir: str = field(default="", metadata=PATH)
    strict: bool = False
    seed: int = 0
    heldout_fraction: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThinkConfig:
    """Offline thinking generation (`tpt think`): one trajectory per document of `corpus`.

    Attributes:
        model_dir: the generator as written by `tpt convert from-hf` (with its tokenizer files).
        dtype: compute dtype of generation; empty keeps the model folder's (bfloat16 by
            default: right on TPUs and GPUs, but several times slower than float32 on CPUs).
        corpus: the documents to augment.
        output_dir: where augmented records go, one folder per shard, committed in chunks;
            empty: <run.root>/<run.name>/thinking.
        template: built-in template name (default, random_focus, back_thinking) or a file path.
        chat_template: wrap the prompt in the model's chat template (assistant turn opened).
        chat_template_kwargs: extra variables of the chat template, as transformers'
            `apply_chat_template(**kwargs)` takes them (e.g. `{enable_thinking: false}` for
            Qwen3, whose template then closes an empty <think></think> block in the prompt).
        max_document_tokens: documents are cut to this many generator tokens in the prompt.
        max_new_tokens: generation cap per document.
        temperature, top_p, top_k, seed: sampling (paper: 0.6 and 0.9); each document draws with
            a seed derived from `seed` and its id, so reruns are reproducible.
        stop: strings that end a generation (not kept in the thinking).
        on_length: a generation that hits the cap without a stop string is kept as is ("keep"),
            written without thinking ("drop"), or cut back to its last complete line ("truncate").
        chunk_size: finished documents per atomically committed output chunk.
        max_concurrent_decodes: decode slots of the engine (continuous batching).
        page_size: tokens per page of the local engine's paged KV cache.
        kv_cache_tokens: the KV cache's capacity in tokens, shared by all slots (pages are
            given as sequences grow and returned when they finish); 0 = enough for every slot
            at its longest. A smaller cache runs more slots in the same memory when most
            generations end early; if the slots in flight run out, the newest is preempted
            and recomputed later (same result).
        prefill_chunk: prompt tokens the local engine prefills per step (long prompts are
            written into the cache in chunks of this many; a multiple of page_size).
        group_by: metadata field the summary and plot break thinking lengths down by.
        backend: "local" (the engine in this process), "jetstream" (a JetStream gRPC server
            at `address`, e.g. `tpt serve` or MaxText's; it samples with its own settings), or
            "openai" (an OpenAI-compatible `/v1/completions` server at `address`, e.g. vLLM), or
            "teacher" (the synthetic testbed's rule-based teacher; no model needed).
        address: host:port (or base URL) of the remote server.
        model_name: the `model` field of OpenAI requests; empty: the name of `model_dir`.
        api_key_env: environment variable holding the OpenAI server's API key, if it needs one.
        concurrency: requests in flight to a remote server.
        timeout_s: deadline of one remote request.
        retries: attempts after the first failure (exponential backoff); a document that still
            fails stays pending for the next run, never lost.
        preemption_grace_s: after SIGTERM, how long remote requests in flight may still finish
            (finished documents are committed at once); the rest stay pending.
        allow_settings_change: add to an output folder generated with other settings (template,
            generator, sampling, lengths); the change is recorded in its settings_changes.jsonl.
    """

    model_dir: str = field(default="", metadata=PATH)
    dtype: str = ""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    output_dir: str = field(default="", metadata=PATH)
    template: str = field(default="default", metadata=PATH)
    chat_template: bool = True
    chat_template_kwargs: dict = field(default_factory=dict)
    max_document_tokens: int = 2048
    max_new_tokens: int = 8192
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    seed: int = 0
    stop: list = field(default_factory=lambda: ["</think>"])
    on_length: str = "keep"
    chunk_size: int = 64
    max_concurrent_decodes: int = 16
    page_size: int = 64
    kv_cache_tokens: int = 0
    prefill_chunk: int = 512
    group_by: str = ""
    backend: str = "local"
    address: str = "localhost:9000"
    model_name: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 16
    timeout_s: float = 600.0
    retries: int = 3
    preemption_grace_s: float = 10.0
    allow_settings_change: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalTaskConfig:
    """One evaluation of `tpt eval`.

    Attributes:
        name: the key of its results (for "lm_eval": the name the task runs under).
        kind: "lm_eval" (a task of lm-evaluation-harness, on local files), "perplexity"
            (held-out JSONL `text`), "answer" (the testbed's answer right after the question:
            its loss and the greedy exact match), or "think_first" (the question, then the
            opening of `data.tpt_template`'s thinking; the answer is the last answer statement
            of the generated reasoning, its conclusion).
        task: "lm_eval": the lm-eval task it runs (e.g. gsm8k_cot, boolq, or ours under
            tpt_jax/eval/tasks such as tpt_minerva_math): its prompts, exemplars, filters, metrics.
        path: the data file (JSON/JSONL, local; nothing is downloaded): the test split.
        fewshot_path: "lm_eval": the file of the few-shot split, for tasks that draw their
            exemplars from one (the first `shots` records with lm-eval's first_n sampler).
        shots: "lm_eval": few-shot exemplars per prompt; -1: the task's own setting.
        limit: score at most this many records (0: all); "lm_eval" tasks use eval.limit.
        max_new_tokens: generation cap (paper: up to 2048); for "lm_eval" 0 keeps the task's.
        answer_prefix: "answer": what follows the question before the answer.
    """

    name: str = ""
    kind: str = "perplexity"
    task: str = ""
    path: str = field(default="", metadata=PATH)
    fewshot_path: str = field(default="", metadata=PATH)
    shots: int = -1
    limit: int = 0
    max_new_tokens: int = 256
    answer_prefix: str = " Answer:"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """`tpt eval`: a model folder scored on local evaluation files.

    Attributes:
        model_dir: a model folder (`tpt export` or `tpt convert from-hf`); empty: the latest
            checkpoint of checkpoint.output_dir/run_name, exported to <run>/export first.
        tasks: the evaluations.
        output: results JSON; empty: eval.json beside the model (or in the run folder).
        batch_size: rows scored / prompts generated together.
        limit: "lm_eval" tasks: at most this many documents per task (0: all; for smoke tests).
    """

    model_dir: str = field(default="", metadata=PATH)
    tasks: list[EvalTaskConfig] = field(default_factory=list)
    output: str = field(default="", metadata=PATH)
    batch_size: int = 32
    limit: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Metrics output.

    Attributes:
        log_every: steps between console / TensorBoard / JSONL records.
        tensorboard: write TensorBoard event files into the run folder.
        jsonl: write one JSON line of metrics per logged step into the run folder.
        peak_flops_per_device: the accelerator's peak FLOP/s used for MFU; 0 = not reported.
    """

    log_every: int = 10
    tensorboard: bool = True
    jsonl: bool = True
    peak_flops_per_device: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where a run's outputs live (like MaxText's base_output_directory and run_name).

    Every output path left empty derives from these two (tpt_jax/config/_paths.py):
    <root>/<name>/ (checkpoints, metrics, TensorBoard, eval, export), <root>/<name>/thinking,
    and <root>/data/<data.name>/ (vocabulary, prepared rows). Paths may say {root} and {name}.

    Attributes:
        root: the output root, local or gs://. Relative: to the working folder when given on
            the command line (or left at its default), to the config file's folder when set in
            one, like every other path.
        name: the experiment's name; empty: the config file's stem.
    """

    root: str = field(default="runs", metadata=PATH)
    name: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run. Sections are independent; functions take the section they need."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    think: ThinkConfig = field(default_factory=ThinkConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Where each dotted key got its value ("configs/x.yaml", "override a.b=1"); filled by the
    # loader so that later checks (device count, checkpoint shapes) can name the file at fault.
    sources: dict = field(
        default_factory=dict, compare=False, repr=False, metadata={"internal": True}
    )

    def source_of(self, key: str) -> str:
        """The file or override that set `key` (dotted), or "the defaults"."""
        return origin_of(self.sources, key)


def origin_of(sources: dict, key: str) -> str:
    """The file or override that set dotted `key` or its nearest enclosing key."""
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return "the defaults"
