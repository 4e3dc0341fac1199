"""memgraph.lora_linear's Triton kernels one at a time, on Llama-3-8B's projection shapes, against the memory each
must move; ``--sweep`` searches each kernel's tiles and launch options.

    python benchmarks/bench_lora_kernels.py             # GPU: the module's tiles (~1 minute)
    python benchmarks/bench_lora_kernels.py --sweep     # GPU: coordinate search per kernel (several minutes)
    python benchmarks/bench_lora_kernels.py --device cpu --tokens 32   # smoke run (interpreter)

A LoRA linear runs six kernel calls a step: forward ``xa = x @ A.T`` and ``out = base + scale * xa @ B.T`` (twice
where the layer is recomputed), backward ``dB``, ``gxa = scale * g @ B``, ``dA`` and ``dx += gxa @ A``. Each is
timed alone inside a CUDA graph (no host time), cycling through input copies larger than L2 together, and
reported with its bandwidth (the bytes it must read and write over the time). ``step_ms`` weighs them by how often
a Llama-3-8B step runs them (7 linears a layer, 32 layers, forwards twice but down_proj's out) -- what LoRA costs a
step at that length. The sweep varies one option of one kernel at a time from the module's tiles, keeps an
improvement, and goes round ``--rounds`` times; every variant's result is checked against the module's own. Results:
``lora_kernels.json`` (rows: kernel, config, role, shape, tokens, us, gb_s; plus a summary row per kernel).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exclusive_gpu_timing, print_table, write_results  # noqa: E402

from memgraph.kernels import lora  # noqa: E402

RANK, SCALE = 16, 2.0
LAYERS = 32
FORWARD_PASSES = 2  # forward, and the recompute of a checkpointed (offloaded) layer
# (features, outputs) and how many such linears a Llama-3-8B layer has
SHAPES = {"q/o_proj": ((4096, 4096), 2), "k/v_proj": ((4096, 1024), 2), "gate/up_proj": ((4096, 14336), 2),
          "down_proj": ((14336, 4096), 1)}
KERNELS = {"rows_times_small": ("xa", "gxa"), "small_times_cols": ("out", "dx"), "cols_reduced": ("dB", "dA")}
TILES = {"rows_times_small": "ROWS_TIMES_SMALL", "small_times_cols": "SMALL_TIMES_COLS",
         "cols_reduced": "COLS_REDUCED"}
FORWARD_ROLES = ("xa", "out")
# ... except down_proj's out: backward reads only its xa (passes.lora.split_forward), so it is not recomputed
NOT_RECOMPUTED = {("out", "down_proj")}
SEARCH = {
    "rows_times_small": {"BLOCK_M": [32, 64, 128], "BLOCK_K": [32, 64, 128], "num_warps": [4, 8],
                         "num_stages": [2, 3, 4]},
    "small_times_cols": {"PRODUCT_DOTS": [0, 3, 6], "BLOCK_M": [32, 64, 128], "BLOCK_N": [64, 128, 256],
                         "num_warps": [4, 8]},
    "cols_reduced": {"BLOCK_M": [32, 64, 128], "BLOCK_N": [64, 128, 256], "num_warps": [4, 8],
                     "num_stages": [2, 3, 4]},
}
SPLIT_SEARCH = {"PROGRAMS_PER_MULTIPROCESSOR": [2, 4, 8], "MIN_STEPS_PER_SPLIT": [2, 4, 8]}
CALLS_PER_GRAPH = 12
REPLAYS = 10
INPUT_COPIES = 3  # cycled: 3 x 16 MiB (the smallest operand) outlasts an H100's 50 MiB L2


def _inputs(tokens: int, features: int, outputs: int, device: str, seed: int) -> dict:
    generator = torch.Generator(device).manual_seed(seed)

    def randn(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, device=device, generator=generator) * scale).to(dtype)

    x, base, g = randn(tokens, features, dtype=torch.bfloat16), randn(tokens, outputs, dtype=torch.bfloat16), \
        randn(tokens, outputs, dtype=torch.bfloat16)
    a, b = randn(RANK, features, scale=features ** -0.5), randn(outputs, RANK, scale=RANK ** -0.5)
    xa, gxa = x.float() @ a.t(), (g.float() * SCALE) @ b
    accumulate = randn(tokens, features, dtype=torch.bfloat16)
    return dict(x=x, base=base, g=g, a=a, b=b, xa=xa, gxa=gxa, out=torch.empty_like(base),
                grad_a=torch.empty_like(a), grad_b=torch.empty_like(b), accumulate=accumulate,
                timed_target=accumulate.clone())  # what timed dx calls sum into, call after call


def _call(role: str, t: dict):
    """Run one role's kernel on inputs ``t``; returns what it wrote."""
    if role == "xa":
        lora._rows_times_small(t["x"], t["a"].t(), t["xa"], 1.0)
        return t["xa"]
    if role == "out":
        lora._small_times_cols(t["xa"], t["b"].t(), t["base"], t["out"], SCALE, False)
        return t["out"]
    if role == "dB":
        lora._cols_reduced(t["g"], t["xa"], t["grad_b"], SCALE)
        return t["grad_b"]
    if role == "gxa":
        lora._rows_times_small(t["g"], t["b"], t["gxa"], SCALE)
        return t["gxa"]
    if role == "dA":
        lora._cols_reduced(t["x"], t["gxa"], t["grad_a"].t(), 1.0)
        return t["grad_a"]
    if role == "dx":  # into a copy: accumulate itself stays the same across calls
        target = t["accumulate"].clone()
        lora._small_times_cols(t["gxa"], t["a"], target, target, 1.0, True)
        return target
    raise ValueError(f"unknown role {role!r}; choose from {sum(KERNELS.values(), ())}")


def _bytes(role: str, tokens: int, features: int, outputs: int) -> int:
    """What a role must read and write at least (16-bit activations, float32 [M, R])."""
    small = tokens * RANK * 4
    return {"xa": tokens * features * 2 + small, "out": 2 * tokens * outputs * 2 + small,
            "dB": tokens * outputs * 2 + small, "gxa": tokens * outputs * 2 + small,
            "dA": tokens * features * 2 + small, "dx": 2 * tokens * features * 2 + small}[role]


def _time_us(role: str, copies: list[dict]) -> float:
    """Per-call GPU time of ``role``, replaying a CUDA graph of CALLS_PER_GRAPH calls over the input copies."""
    for t in copies:
        _call(role, t)  # compiles, and fills caches outside the capture
    if role == "dx":  # the clone is not the kernel: time dx in place, into a target of its own (accumulate
        def run(t):    # stays as it was: the results of later variants are checked against it)
            lora._small_times_cols(t["gxa"], t["a"], t["timed_target"], t["timed_target"], 1.0, True)
    else:
        def run(t):
            _call(role, t)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in range(CALLS_PER_GRAPH):
            run(copies[call % len(copies)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPLAYS * CALLS_PER_GRAPH)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


class _Bench:
    def __init__(self, tokens: list[int], device: str):
        self.device = device
        self.inputs = {(name, n): [_inputs(n, *shape, device, seed) for seed in range(INPUT_COPIES)]
                       for n in tokens for name, (shape, _) in SHAPES.items()}
        self.reference: dict = {}  # (role, shape, tokens) -> the module's own result

    def measure(self, kernel: str, config: str) -> tuple[list[dict], float]:
        """Rows for ``kernel``'s roles on every shape and length, and its weighted step time (ms, all lengths)."""
        rows, step_ms = [], 0.0
        for (name, tokens), copies in self.inputs.items():
            (features, outputs), per_layer = SHAPES[name]
            for role in KERNELS[kernel]:
                result = _call(role, copies[0]).clone()
                key = (role, name, tokens)
                error = _relative_error(result, self.reference.setdefault(key, result))
                tolerance = 1e-5 if result.dtype == torch.float32 else 4e-3
                if not error <= tolerance:
                    raise AssertionError(f"{kernel} {config}: {role} on {name} x {tokens} differs from the "
                                         f"module's result by {error:.2e} > {tolerance}")
                us = _time_us(role, copies) if self.device == "cuda" else float("nan")
                recomputed = role in FORWARD_ROLES and (role, name) not in NOT_RECOMPUTED
                times = LAYERS * per_layer * (FORWARD_PASSES if recomputed else 1)
                rows.append(dict(kernel=kernel, config=config, role=role, shape=name, tokens=tokens, us=us,
                                 gb_s=_bytes(role, tokens, features, outputs) / us / 1e3, rel_err=error,
                                 step_ms=us * times / 1e3))
                step_ms += us * times / 1e3 * 2048 / tokens  # per 2048 tokens: lengths weigh alike
        return rows, step_ms


def _describe(tiles: dict, splits: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in {**tiles, **splits}.items())


def _apply(kernel: str, tiles: dict, splits: dict) -> None:
    setattr(lora, TILES[kernel], tiles)
    for name, value in splits.items():
        setattr(lora, name, value)


def _search(bench: _Bench, kernel: str, rounds: int, deadline: float) -> tuple[list[dict], dict]:
    """Coordinate search from the module's tiles: one option at a time, keeping what lowers the step time."""
    best_tiles = copy.deepcopy(getattr(lora, TILES[kernel]))
    best_splits = {name: getattr(lora, name) for name in SPLIT_SEARCH} if kernel != "small_times_cols" else {}
    _apply(kernel, best_tiles, best_splits)
    rows, best_ms = bench.measure(kernel, "module")
    summary = {"kernel": kernel, "module_step_ms": best_ms, "module_config": _describe(best_tiles, best_splits)}
    space = {**SEARCH[kernel], **(SPLIT_SEARCH if best_splits else {})}
    for _, (option, values) in itertools.product(range(rounds), space.items()):
        for value in values:
            if time.monotonic() > deadline:
                break
            tiles, splits = dict(best_tiles), dict(best_splits)
            (splits if option in SPLIT_SEARCH else tiles)[option] = value
            if (tiles, splits) == (best_tiles, best_splits):
                continue
            _apply(kernel, tiles, splits)
            try:
                new_rows, step_ms = bench.measure(kernel, _describe(tiles, splits))
            except Exception as error:  # noqa: BLE001 - a variant that does not compile or is wrong is skipped
                print(f"  {kernel} {_describe(tiles, splits)}: {type(error).__name__}: {str(error)[:160]}")
                continue
            rows += new_rows
            print(f"  {kernel} {_describe(tiles, splits)}: {step_ms:.2f} ms (best {best_ms:.2f})")
            if step_ms < best_ms:
                best_ms, best_tiles, best_splits = step_ms, tiles, splits
    _apply(kernel, best_tiles, best_splits)
    summary.update(best_step_ms=best_ms, best_config=_describe(best_tiles, best_splits))
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--sweep", action="store_true", help="search each kernel's tiles and launch options")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop searching after this long")
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS),
                        help="measure or search only these kernels")
    args = parser.parse_args()
    if args.device == "cpu":
        SHAPES.update({name: ((features // 128, outputs // 128), n)
                       for name, ((features, outputs), n) in SHAPES.items()})
    deadline = time.monotonic() + args.budget_s
    bench = _Bench(args.tokens, args.device)
    rows, summaries = [], []
    with exclusive_gpu_timing() if args.device == "cuda" else contextlib.nullcontext():
        for kernel in args.kernels:
            if args.sweep:
                kernel_rows, summary = _search(bench, kernel, args.rounds, deadline)
            else:
                kernel_rows, step_ms = bench.measure(kernel, "module")
                summary = {"kernel": kernel, "module_step_ms": step_ms,
                           "module_config": _describe(getattr(lora, TILES[kernel]), {})}
            rows += kernel_rows
            summaries.append(summary)
    print_table([r for r in rows if r["config"] == "module"])
    print_table(summaries)
    write_results("lora_kernels", rows + [dict(summary=True, **s) for s in summaries],
                  note=f"step_ms: {LAYERS} layers x 7 linears, forward roles x{FORWARD_PASSES}, per 2048 tokens "
                       f"summed over the lengths {args.tokens}; rank {RANK}, bf16 activations, float32 adapters")


if __name__ == "__main__":
    main()
