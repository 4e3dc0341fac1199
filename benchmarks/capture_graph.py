"""Capture one training step of a reference model (random weights) and save its joint graph for planning anywhere:
``memgraph.load_graph`` rebuilds it on fake tensors (tests/data holds the H200 captures).

    python benchmarks/capture_graph.py --recipe qlora --rewrites nf4,cross_entropy --out llama3_8b_qlora_ce.json.gz

The model, inputs and node names are those of ``bench_planner.capture_recipe`` (Llama-3-8B by default, batch 1,
LoRA r=16 on every projection; qlora = bitsandbytes NF4 base layers).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_planner import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="qlora", choices=["lora", "qlora"])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rewrites", default="nf4,cross_entropy", help="comma-separated memgraph rewrites")
    parser.add_argument("--drop-logits", action="store_true")
    parser.add_argument("--kv-bits", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import memgraph
    from memgraph.capture import capture

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(args.recipe, args.model, device)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    options = {"rewrites": [r for r in args.rewrites.split(",") if r] or False, "drop_logits": args.drop_logits,
               "kv_bits": args.kv_bits}
    (captured,) = capture(model, options=options, solvers=("none",), input_ids=ids, labels=ids)
    path = memgraph.save_graph(captured.graph, args.out)
    print(f"captured {args.recipe} {args.model} seq {args.seq} with rewrites {captured.rewrites} in "
          f"{time.perf_counter() - started:.1f} s: {len(captured.graph.joint.graph.nodes)} joint nodes -> {path}")


if __name__ == "__main__":
    main()
