"""``memgraph`` command line: ``demo`` (train a tiny embedded model eagerly and with the backend, side by side)
and ``plan`` (plan a model's training step without training)."""
from __future__ import annotations

import argparse
import copy
import logging
import sys
from typing import Sequence

LOSS_RTOL = 1e-4  # float32: the compiled step must reproduce eager's loss to this relative error
GRAD_RTOL = 1e-3  # ... and every trainable gradient to this one (norm-wise)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _relative_error(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _train(model, batches, steps: int, lr: float):
    """Losses and, after the first step, the gradients of every trainable parameter."""
    import torch

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, first_grads = [], None
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if first_grads is None:
            module = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes parameter names
            first_grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, first_grads


def demo(args: argparse.Namespace) -> int:
    import torch

    from memgraph import models, pipeline
    from memgraph.options import resolve_options

    device = _device(args.device)
    eager_model = models.build(args.model, lora=args.lora, device=device)
    compiled_source = copy.deepcopy(eager_model)
    generator = torch.Generator().manual_seed(1234)
    vocab = eager_model.config.vocab_size
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device) for _ in range(2)]
    options = {"solver": args.solver, "codegen": args.codegen, "kv_bits": args.kv_bits}
    if args.memory_budget:
        options["memory_budget"] = args.memory_budget
    if args.cudagraphs:
        options["cudagraphs"] = True
    resolve_options(options)  # bad options: a clear error now, not one wrapped by Dynamo at the first step
    print(f"memgraph demo: tiny {args.model}{' + LoRA' if args.lora else ''} on {device}, batch {args.batch}, "
          f"seq {args.seq}, {args.steps} SGD steps, options {options}")
    before = len(pipeline.compiled_graphs())
    eager_losses, eager_grads = _train(eager_model, batches, args.steps, args.lr)
    compiled = torch.compile(compiled_source, backend="memgraph", options=options)
    compiled_losses, compiled_grads = _train(compiled, batches, args.steps, args.lr)

    print(f"\n{'step':>4}  {'eager loss':>12}  {'memgraph loss':>14}  {'rel err':>9}")
    worst_loss = 0.0
    for step, (a, b) in enumerate(zip(eager_losses, compiled_losses)):
        error = abs(a - b) / max(abs(a), 1e-30)
        worst_loss = max(worst_loss, error)
        print(f"{step:>4}  {a:>12.6f}  {b:>14.6f}  {error:>9.2e}")
    worst_grad = max(_relative_error(compiled_grads[n], g) for n, g in eager_grads.items())
    print(f"\nfirst step, worst gradient relative error over {len(eager_grads)} trainable tensors: {worst_grad:.2e}")
    for record in pipeline.compiled_graphs()[before:]:
        if record.plan is None:
            continue
        plan = record.plan
        print(f"\ngraph {record.graph_id}: rewrites {record.rewrites or 'none'}; {plan.summary()}")
        print(f"  saved ({len(plan.saved)}): {', '.join(plan.saved[:12])}{' ...' if len(plan.saved) > 12 else ''}")
        print(f"  recomputed ({len(plan.recomputed)}): {', '.join(plan.recomputed[:12]) or '-'}"
              f"{' ...' if len(plan.recomputed) > 12 else ''}")
    ok = worst_loss <= LOSS_RTOL and worst_grad <= GRAD_RTOL
    print(f"\n{'OK' if ok else 'MISMATCH'}: loss rel err {worst_loss:.2e} (limit {LOSS_RTOL:g}), "
          f"grad rel err {worst_grad:.2e} (limit {GRAD_RTOL:g})")
    return 0 if ok else 1


def plan_command(args: argparse.Namespace) -> int:
    import memgraph
    from memgraph.sources import training_options, training_subject

    model, inputs, _ = training_subject(args)
    options = {**training_options(args), "solver": args.solver}
    if args.memory_budget:
        options["memory_budget"] = args.memory_budget
    result = memgraph.plan(model, example_kwargs=inputs, **options)
    print(result.summary())
    for note in result.notes:
        print(f"  {note}")
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(result.to_json())
        print(f"wrote {args.json}")
    return 0


def fit_command(args: argparse.Namespace) -> int:
    import memgraph
    from memgraph.sources import training_options

    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    result = memgraph.fit(args.model, args.memory, batches=batches, weights=args.weights,
                          lora=None if args.full else args.lora, optimizer=args.optimizer, max_seq=args.max_seq,
                          host_embedding={"auto": None, "on": True, "off": False}[args.host_embedding],
                          **training_options(args))
    print(result.table())
    print(f"\n({result.seconds:.0f} s; peak = the step's predicted peak + the optimizer's state; "
          f"max seq from the symbolic peak of the leanest plan, checked by an ilp plan at that length; "
          f"tok/s from the cost model's roofline of an H100/H200-class GPU, whatever the memory size)")
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(result.to_json())
        print(f"wrote {args.json}")
    if args.png:
        print(f"wrote {result.plot(args.png)}")
    return 0


def _add_common(parser: argparse.ArgumentParser, default_model: str = "llama") -> None:
    from memgraph import models

    parser.add_argument("--model", default=default_model, choices=list(models.TINY),
                        help="embedded tiny model (random weights, nothing downloaded)")
    parser.add_argument("--lora", action="store_true", help="add PEFT LoRA adapters (train only those)")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--solver", default="mincut")
    parser.add_argument("--memory-budget", default=None, help="e.g. 8GiB (budget-aware solvers only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memgraph", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="train a tiny model eagerly and with memgraph; compare")
    _add_common(demo_parser)
    demo_parser.add_argument("--steps", type=int, default=3)
    demo_parser.add_argument("--lr", type=float, default=1e-2)
    demo_parser.add_argument("--codegen", default="inductor", choices=["inductor", "eager"])
    demo_parser.add_argument("--kv-bits", type=int, default=16, choices=[16, 8, 4])
    demo_parser.add_argument("--cudagraphs", action="store_true",
                             help="replay the compiled graphs from CUDA graphs (on a GPU; needs --codegen inductor)")
    demo_parser.set_defaults(run=demo)
    from memgraph.fit import GPU_PRESETS, OPTIMIZERS
    from memgraph.sources import add_training_arguments

    plan_parser = commands.add_parser("plan", help="plan a model's training step without training (any HF model: "
                                                   "without a GPU it is built on the meta device)")
    add_training_arguments(plan_parser, seq=64, weights="bf16", lora=None)
    plan_parser.add_argument("--solver", default="mincut")
    plan_parser.add_argument("--memory-budget", default=None, help="e.g. 8GiB (budget-aware solvers only)")
    plan_parser.add_argument("--json", default=None, help="write the Plan as JSON to this path")
    plan_parser.set_defaults(run=plan_command)
    fit_parser = commands.add_parser(
        "fit", help="the longest sequence (per batch size) that trains within a memory size, without a GPU",
        description="Capture the model's training step on the meta device with dynamic batch and length, and read "
                    "the longest sequence per batch size whose predicted peak (+ optimizer state) fits the memory.")
    add_training_arguments(fit_parser, seq=None, weights="nf4", lora=16)
    fit_parser.add_argument("--memory", default=None, help="a size (24GiB) or a GPU preset (" + ", ".join(GPU_PRESETS)
                            + "); default: this machine's GPU")
    fit_parser.add_argument("--batches", default="1,2,4,8")
    fit_parser.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    fit_parser.add_argument("--max-seq", type=int, default=None, help="cap (default: max_position_embeddings)")
    fit_parser.add_argument("--host-embedding", choices=("auto", "on", "off"), default="auto",
                            help="plan the frozen input embedding in host memory (memgraph.offload_embeddings_; "
                                 "auto: whenever offload is not off)")
    fit_parser.add_argument("--json", default=None)
    fit_parser.add_argument("--png", default=None, help="draw predicted peak vs sequence length per plan")
    fit_parser.set_defaults(run=fit_command)
    from memgraph.compare import add_compare_parser

    add_compare_parser(commands)
    bench_parser = commands.add_parser(
        "bench", help="the end-to-end benchmark against the rival recipes (GPU; a source checkout's "
                      "benchmarks/e2e.py, whose arguments follow: memgraph bench -- --help)")
    bench_parser.add_argument("arguments", nargs=argparse.REMAINDER, help="arguments of benchmarks/e2e.py")
    bench_parser.set_defaults(run=lambda args: bench_command(args.arguments))
    return parser


def bench_command(arguments: list[str]) -> int:
    """Run benchmarks/e2e.py of the checkout this package lives in (benchmarks are not part of a wheel)."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "e2e.py"
    if not script.exists():
        raise ValueError(f"memgraph bench runs benchmarks/e2e.py from a source checkout (pip install -e .); "
                         f"there is none at {script}")
    arguments = arguments[1:] if arguments[:1] == ["--"] else arguments
    return subprocess.run([sys.executable, str(script), *arguments]).returncode


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every later argument is e2e.py's (argparse would claim its options)
        try:
            return bench_command(argv[1:])
        except ValueError as error:
            print(f"memgraph: error: {error}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ValueError as error:  # bad input: say what is wrong, no traceback
        print(f"memgraph: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
