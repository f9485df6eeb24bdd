"""`tpt`: one sub-command per pipeline stage, each taking a config file and key=value overrides.

A mistake the user can fix (config, input file, missing capability) prints one line,
`tpt: error: ...`, and exits non-zero without a traceback. Heavy imports (jax, flax) happen
inside the sub-commands so that config errors are reported at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Sequence

from tpt_jax import extras, logs
from tpt_jax.errors import TptError

RUN_COMPLETE = "tpt: run complete"
VERBOSE_HELP = "keep the libraries' DEBUG logs and TensorFlow's native start-up output"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # package data


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (may use `base:` inheritance)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides")


def _load(args: argparse.Namespace, training: bool = False):
    """The config, checked against this machine's devices (`training`: also the training batch
    against the data-parallel size; see validate_for_devices)."""
    from tpt_jax.config import load_config, validate_for_devices

    cfg = load_config(args.config, args.overrides)
    import jax

    validate_for_devices(cfg, jax.device_count(), training)
    return cfg


def _check_output_folder(path: str, key: str, cfg) -> None:
    """A local output folder that is (or lies under) a regular file fails deep inside a library
    after the run's set-up; say so at once, naming the key."""
    if not path or "://" in path:
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise TptError(
            f"config key '{key}': {path} cannot be a folder: {existing} is a file "
            f"({cfg.source_of(key)}); choose another path"
        )


@contextlib.contextmanager
def _naming(path: str):
    """An OSError inside names `path` (a failed write() reports no file name of its own)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = path
        raise


def _cmd_config(args: argparse.Namespace) -> None:
    from tpt_jax.config import (
        check_paths,
        dump_yaml,
        load_config,
        mesh_shape,
        topology_chips,
        validate_for_devices,
    )

    cfg = load_config(args.config, args.overrides)
    devices = args.devices
    if devices is None and cfg.mesh.topology:  # a pod config: check it against its own slices
        devices = topology_chips(cfg.mesh.topology) * cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp
    elif devices is None:
        import jax

        devices = jax.device_count()
    validate_for_devices(cfg, devices)
    check_paths(cfg)
    print(dump_yaml(cfg), end="")
    mesh = {k: v for k, v in mesh_shape(cfg, devices).items() if v != 1} or {"data": 1}
    print(f"# valid for {devices} devices; mesh " + " x ".join(f"{k}={v}" for k, v in mesh.items()))


def _cmd_convert(args: argparse.Namespace) -> None:
    from tpt_jax.model import convert

    if args.direction == "from-hf":
        summary = convert.hf_to_tpt(args.src, args.dst, param_dtype=args.param_dtype)
        print(f"converted {summary['family']} ({summary['parameters']:,} parameters) -> {args.dst}")
    else:
        max_bytes = _parse_size(args.max_shard_size)
        summary = convert.tpt_to_hf(args.src, args.dst, dtype=args.dtype, max_shard_bytes=max_bytes)
        print(f"exported {summary['family']} in {summary['shards']} shard(s) -> {args.dst}")
    if summary["copied"]:
        print("copied " + ", ".join(summary["copied"]))


def _parse_size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    upper = text.strip().upper()
    for suffix, scale in units.items():
        if upper.endswith(suffix):
            try:
                return int(float(upper[: -len(suffix)]) * scale)
            except ValueError:
                break
    if upper.isdigit():
        return int(upper)
    raise TptError(f"--max-shard-size {text!r} is not a size such as 5GB, 500MB or 1048576")


def _cmd_train(args: argparse.Namespace) -> None:
    from tpt_jax.train.run import run_training

    cfg = _load(args, training=True)
    _check_output_folder(cfg.checkpoint.output_dir, "checkpoint.output_dir", cfg)
    result = run_training(cfg)
    print(
        f"train: finished at step {result.final_step}, loss {result.last_loss:.4f}, run folder {result.run_dir}"
    )
    if result.final_step == cfg.train.steps:
        print(RUN_COMPLETE)  # tpu_scripts/relaunch.sh stops relaunching on this line


def _cmd_think(args: argparse.Namespace) -> None:
    from tpt_jax.think.driver import run_think
    from tpt_jax.think.summary import format_summary

    cfg = _load(args)
    needs_model = cfg.think.backend != "teacher"
    if not ((cfg.think.model_dir or not needs_model) and cfg.think.output_dir
            and cfg.think.corpus.paths):  # fmt: skip
        raise TptError("tpt think needs think.model_dir, think.output_dir and think.corpus.paths")
    _check_output_folder(cfg.think.output_dir, "think.output_dir", cfg)
    if cfg.think.backend == "jetstream":
        extras.load("serve", "think.backend 'jetstream'", args.verbose, extras.JETSTREAM_CLIENT)
    if args.shard:
        try:
            index, count = (int(x) for x in args.shard.split("/"))
            assert 0 <= index < count
        except (ValueError, AssertionError):
            raise TptError(
                f"--shard {args.shard!r} is not of the form i/n with 0 <= i < n"
            ) from None
    else:
        import jax

        index, count = jax.process_index(), jax.process_count()
    summary = run_think(cfg, (index, count))
    print(format_summary(summary))
    if not summary["stopped_early"] and not summary["left_pending"]:
        print(RUN_COMPLETE)  # tpu_scripts/relaunch.sh stops relaunching on this line


def _cmd_sample(args: argparse.Namespace) -> None:
    from tpt_jax.generate.sample import run_sample

    cfg = _load(args)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise TptError(f"--prompts-file {args.prompts_file}: {e}") from None
    elif args.prompt is not None:
        prompts = [args.prompt]
    else:
        raise TptError("tpt sample needs --prompt TEXT or --prompts-file FILE")
    for prompt, completion in zip(
        prompts, run_sample(cfg, prompts, args.max_new_tokens, args.raw), strict=True
    ):
        print(f"=== {prompt}\n{completion}")


def _cmd_serve(args: argparse.Namespace) -> None:
    cfg = _load(args)
    if not cfg.think.model_dir:
        raise TptError(
            "tpt serve needs think.model_dir (a folder written by `tpt convert from-hf`)"
        )
    extras.load("serve", "tpt serve", args.verbose)
    from tpt_jax.generate.serve import start_server

    server, prefill = start_server(cfg, args.port, args.max_prefill_length, args.host)
    print(
        f"serve: JetStream gRPC on port {args.port} of {args.host} ({cfg.think.model_dir}, "
        f"prompts up to {prefill} tokens); Ctrl-C stops",
        flush=True,
    )
    server.wait_for_termination()


def _cmd_prepare(args: argparse.Namespace) -> None:
    cfg = _load(args)
    _check_output_folder(cfg.data.prepared_dir, "data.prepared_dir", cfg)
    extras.load("prepare", "tpt prepare", args.verbose)
    from tpt_jax.data.prepare import run_prepare, summarize  # Beam, SeqIO: after the checks

    print(summarize(run_prepare(cfg, args.beam_args)))


def _cmd_vocab(args: argparse.Namespace) -> None:
    import itertools

    from tpt_jax.data import readers, vocab
    from tpt_jax.data.rejects import BadInputError, RejectLog

    cfg = _load(args)
    out = args.out or cfg.data.vocab_path
    if not out:
        raise TptError("tpt vocab train: give --out or set data.vocab_path")
    if not cfg.data.corpora:
        raise TptError("tpt vocab train: data.corpora is empty; nothing to train on")
    rejects = RejectLog(strict=cfg.data.strict)

    def texts():
        # SentencePiece calls this from C++: a strict-mode error ends the stream, reported below.
        try:
            for corpus in cfg.data.corpora:
                docs = itertools.islice(readers.read_corpus(corpus, rejects), args.sample_docs)
                for doc in docs:
                    yield doc.text
                    if doc.thinking:
                        yield doc.thinking
        except BadInputError:
            return

    model = vocab.train(
        texts(),
        None,
        vocab_size=args.vocab_size or cfg.model.vocab_size,
        model_type=args.model_type,
        byte_fallback=not args.no_byte_fallback,
        user_defined_symbols=args.symbols.split(",") if args.symbols else (),
    )
    if rejects.first_error:
        raise BadInputError(rejects.first_error)  # nothing written
    with _naming(out):
        digest = vocab.write(out, model)
    print(f"vocab: wrote {out} ({digest}); input: {rejects.summary()}")


def _default_config(args: argparse.Namespace, name: str) -> None:
    """For commands whose config is optional: a first `key=value` is an override, not a file."""
    if args.config is not None and "=" in args.config:
        args.overrides, args.config = [args.config, *args.overrides], None
    args.config = args.config or os.path.join(CONFIG_DIR, name)


def _cmd_bench(args: argparse.Namespace) -> None:
    from tpt_jax.bench import benchmark_train_step, format_result

    _default_config(args, "bench.yaml")
    print(format_result(benchmark_train_step(_load(args, training=True), steps=args.steps)))


def _cmd_compile(args: argparse.Namespace) -> None:
    # The compile target is a described TPU slice: the local devices are never needed, and on a
    # TPU VM that is training they are busy (libtpu allows one owner per machine).
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from tpt_jax.config import load_config
    from tpt_jax.train import compile_for_topology, format_report

    cfg = load_config(args.config, args.overrides)
    if cfg.think.corpus.paths:
        raise TptError(
            f"{args.config} is a thinking-generation config (think.corpus is set); tpt compile "
            "compiles a config's train step"
        )
    topology = args.topology or cfg.mesh.topology
    if not topology:
        raise TptError(
            f"{args.config}: no TPU topology to compile for; set mesh.topology or pass --topology"
        )
    slices = args.slices or cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp
    report = compile_for_topology(cfg, topology, slices, estimate=not args.no_estimate)
    print(format_report(report))
    if not report.fits:
        raise TptError(f"the train step does not fit in {topology}'s HBM (see above)")


def _cmd_demo(args: argparse.Namespace) -> None:
    from tpt_jax.demo import DemoOptions, run_demo

    _default_config(args, "demo.yaml")
    extras.load("prepare", "tpt demo", args.verbose)  # the demo runs `tpt prepare`
    if args.all:
        settings = ("abundant", "constrained")
    else:
        settings = ("constrained",) if args.constrained else ("abundant",)
    options = DemoOptions(
        settings=settings, seeds=args.seeds, heldout=args.heldout, documents=args.documents,
        quick=args.quick,
    )  # fmt: skip
    run_demo(args.config, args.overrides, args.out, options)


def _cmd_eval(args: argparse.Namespace) -> None:
    from tpt_jax.eval.run import run_eval

    run_eval(_load(args))


def _cmd_export(args: argparse.Namespace) -> None:
    from tpt_jax.train import run_folder
    from tpt_jax.train.export import export_run

    if args.out is not None and "=" in args.out:  # an override, not a folder
        args.overrides, args.out = [args.out, *args.overrides], None
    cfg = _load(args)
    run_dir = run_folder(cfg)
    out = args.out or os.path.join(run_dir, "export")
    done = export_run(cfg, run_dir, out, hf_dtype=args.dtype)
    print(
        f"export: step {done['step']} -> {done['model_dir']} (tpt_jax) and {done['hf_dir']} "
        f"(HF {done['family']}, {done['shards']} shard(s))"
    )


def _count(most: int | None = None):
    """An argparse type: a whole number from 0 (the default) to `most`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0 or (most is not None and value > most):
            bound = f"0 to {most}" if most is not None else "0 or more"
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {bound}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from tpt_jax.parallel import distributed  # imports JAX: after _skip_absent_tpu

    parser = argparse.ArgumentParser(prog="tpt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "eval", help="lm-eval benchmarks (GSM8K, MATH, BoolQ, ...) and the testbed evals of a model"
    )
    _add_config_args(p)
    distributed.add_arguments(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="a run's latest checkpoint -> model folder + HF folder")
    p.add_argument("config", help="the run's config (its run folder: <run.root>/<run.name>)")
    p.add_argument(
        "out", nargs="?", default=None,
        help="output folder: OUT/model (tpt_jax) and OUT/hf (transformers); default: <run>/export",
    )  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "prepare", help="tokenize, pack and shard the SeqIO tasks of the mixture (Beam)"
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_prepare, beam_args=[])
    p.epilog = "Options this parser does not know (--runner=..., --project=...) go to Apache Beam."

    p = sub.add_parser(
        "sample",
        help="generate from a model folder (think.model_dir, else the run's export) with think.* "
        "sampling",
    )
    _add_config_args(p)
    p.add_argument("--prompt", default=None, help="one prompt")
    p.add_argument("--prompts-file", default="", help="a text file, one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("serve", help="serve think.model_dir over JetStream gRPC")
    _add_config_args(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 or :: for every one)"
    )
    p.add_argument("--port", type=int, default=9000)
    p.add_argument(
        "--max-prefill-length", type=int, default=None,
        help="longest prompt in tokens, a power of two (default: think.max_document_tokens "
        "plus the template's tokens); longer requests get INVALID_ARGUMENT",
    )  # fmt: skip
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("think", help="generate thinking trajectories for a corpus (crash-safe)")
    _add_config_args(p)
    distributed.add_arguments(p)
    p.add_argument(
        "--shard", default="", help="i/n: this worker's share (default: the JAX process)"
    )
    p.set_defaults(func=_cmd_think)

    p = sub.add_parser("vocab", help="train a SentencePiece vocabulary from the config's corpora")
    p.add_argument("action", choices=["train"])
    _add_config_args(p)
    p.add_argument("--vocab-size", type=int, default=0, help="default: model.vocab_size")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    p.add_argument("--no-byte-fallback", action="store_true", help="map unknown characters to UNK")
    p.add_argument(
        "--symbols", default="<think>,</think>", help="comma-separated user-defined symbols"
    )
    p.add_argument("--sample-docs", type=int, default=100_000, help="documents read per corpus")
    p.add_argument("--out", default="", help="model path (default: data.vocab_path)")
    p.set_defaults(func=_cmd_vocab)

    p = sub.add_parser("train", help="train or mid-train a decoder (resumes its run_name)")
    _add_config_args(p)
    distributed.add_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "bench", help="time a config's train step against this machine's matmul rate"
    )
    p.add_argument("config", nargs="?", default=None, help="default: configs/bench.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("config", help="validate a config and print it resolved")
    _add_config_args(p)
    p.add_argument(
        "--devices", type=int, default=None,
        help="check the mesh for this many devices (default: mesh.topology's chips, else local)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser(
        "compile", help="compile the train step for a TPU topology here: memory, collectives, MFU"
    )
    _add_config_args(p)
    p.add_argument(
        "--topology",
        default="",
        help="v5p-128, v6e-256, v5litepod-16, v5p:4x4x4 (default: mesh.topology)",
    )
    p.add_argument(
        "--slices", type=int, default=0, help="slices over DCN (default: mesh.dcn_data x dcn_fsdp)"
    )
    p.add_argument(
        "--no-estimate", action="store_true", help="skip the two small compiles of the estimate"
    )
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("convert", help="HF checkpoint folder <-> tpt_jax model folder")
    p.add_argument("direction", choices=["from-hf", "to-hf"])
    p.add_argument(
        "src", help="from-hf: HF folder (config.json + safetensors); to-hf: tpt_jax folder"
    )
    p.add_argument("dst", help="output folder")
    p.add_argument(
        "--param-dtype", default="float32", choices=["float32", "bfloat16"], help="from-hf"
    )
    p.add_argument(
        "--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="to-hf"
    )
    p.add_argument("--max-shard-size", default="5GB", help="to-hf: largest safetensors file")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("demo", help="the end-to-end job on the embedded default config")
    p.add_argument("config", nargs="?", default=None, help="default: the packaged demo config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument(
        "--constrained",
        action="store_true",
        help="the data-constrained setting (few unique documents) instead of abundant",
    )
    p.add_argument("--all", action="store_true", help="both settings, one figure each")
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer steps, seeds and held-out problems: the same figure and report (CI)",
    )
    p.add_argument(
        "--seeds", type=_count(32), default=0, help="seeds per model (default 3; quick 2)"
    )
    p.add_argument(
        "--documents",
        type=_count(),
        default=0,
        help="abundant corpus size (default: more than the budget reads)",
    )
    p.add_argument("--heldout", type=_count(2000), default=0,
                   help="held-out problems (default 100; quick 24)")  # fmt: skip
    p.set_defaults(func=_cmd_demo)
    for p in sub.choices.values():  # also after the command: `tpt serve CONFIG --verbose`
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help=VERBOSE_HELP)  # fmt: skip
    return parser


def _skip_absent_tpu() -> None:
    """With libtpu installed (for `tpt compile`) on a machine without accelerators, JAX would
    still start the TPU runtime, which prints errors about missing TPU hosts: use the CPU."""
    import glob
    import importlib.util

    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    accelerators = {"0x1ae0", "0x10de", "0x1002"}  # PCI vendors: Google (TPU), NVIDIA, AMD
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() in accelerators:
                    return
        except OSError:
            continue
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: Sequence[str] | None = None) -> int:
    _skip_absent_tpu()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logs.set_native_defaults(args.verbose)  # before any command imports TensorFlow
    logs.settle(args.verbose)
    # key=value overrides may also follow options (argparse leaves those over).
    if hasattr(args, "overrides"):
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if not ("=" in a and not a.startswith("-"))]
    if extra:
        if args.command != "prepare" or not all(a.startswith("--") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.beam_args = extra
    try:
        if hasattr(args, "coordinator"):
            from tpt_jax.parallel import distributed

            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        args.func(args)
    except TptError as e:
        print(f"tpt: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except (OSError, UnicodeDecodeError) as e:
        message = _file_error(e)
        if message is None:
            raise
        print(f"tpt: error: {' '.join(message.split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tpt: interrupted", file=sys.stderr)
        return 130
    return 0


# File-system failures the user can fix (a full disk, a file where a folder belongs, rights):
# one line naming the path. Any other OSError (a socket, ...) keeps its traceback: maybe a bug.
_FILE_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM,
    errno.EEXIST, errno.ENOENT, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP,
}  # fmt: skip


def _file_error(e: OSError | UnicodeDecodeError) -> str | None:
    """The one-line message for a file error, or None for an error that is not one."""
    if isinstance(e, UnicodeDecodeError):  # the readers that know the path say so themselves
        return f"a file is not {e.encoding} text (byte {e.start}: {e.reason})"
    if e.errno not in _FILE_ERRNOS:
        return None
    paths = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{paths}: {e.strerror}" if paths else f"{e.strerror} ({errno.errorcode[e.errno]})"


if __name__ == "__main__":
    sys.exit(main())
