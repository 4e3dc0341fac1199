"""End-to-end training steps of a reference model under several recipes, side by side.

A recipe is ``WEIGHTS/COMPILER[?option=value&...]``:
  WEIGHTS  bf16 (LoRA on bf16 weights) | bnb (QLoRA: bitsandbytes NF4 Linear4bit) | nf4 (memgraph.quantize_)
  COMPILER eager | inductor (torch.compile default) | memgraph (options after '?', e.g. solver=mincut&kv_bits=4;
           a list option joins its items with '+': rewrites=attention+nf4; host_embedding=true first applies
           memgraph.offload_embeddings_) | eager-gc (HF gradient
           checkpointing) | liger-gc (HF gradient checkpointing + Liger-Kernel's kernels, its fused linear
           cross-entropy included) | inductor (torch.compile; options activation_memory_budget=0.3) |
           unsloth (Unsloth's FastLanguageModel QLoRA with its "unsloth" gradient checkpointing; weights bnb
           only: it quantizes at load, from a random-init checkpoint this script saves once per model)
Each recipe runs in its own process with its own empty compile cache (``--cache-dir`` shares one instead: a
second run of the same recipe then measures a warm compile), so none inherits another's warm caches or allocator
state. ``--parallel N`` runs N recipes at once: their untimed phases (model build, compile, first step) overlap,
their timed steps take a machine-wide lock in turn, and only while no recipe builds or compiles (a 2048-token
step is host-bound: on an H100 one recipe timed 1,898 and 5,400 tokens/s beside different concurrent compiles;
``--noisy-timing`` allows the overlap). Measures compile time (first step minus a steady step),
median step time of timed steps after a warm-up step, and peak memory (max_memory_allocated over the steps after
the warm-up step: the second step included, which records the CUDA graphs of a cudagraphs=true recipe, whose
replays allocate nothing; ``reserved_gib`` is max_memory_reserved beside it). ``--profile PATH`` adds one step
under torch.profiler, alone on the GPU: GPU time by kind of kernel (matmul, nf4, lora, attention, copy, ...), the
largest kernels, the share of the step the GPU idles, and the host copies' time with the part no kernel ran beside.

    python benchmarks/bench_e2e.py --name pipeline_overhead --recipes bf16/inductor,bf16/memgraph?solver=mincut
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import linecache
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exclusive_gpu_timing, print_table, untimed_gpu_work, write_results  # noqa: E402

WEIGHTS = ("bf16", "bnb", "nf4")
COMPILERS = ("eager", "inductor", "memgraph", "eager-gc", "liger-gc", "unsloth")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_recipe(recipe: str) -> tuple[str, str, dict]:
    head, _, query = recipe.partition("?")
    weights, _, compiler = head.partition("/")
    if weights not in WEIGHTS or compiler not in COMPILERS:
        raise SystemExit(f"bad recipe {recipe!r}: use WEIGHTS/COMPILER with WEIGHTS in {WEIGHTS}, COMPILER in "
                         f"{COMPILERS}")
    if compiler == "unsloth" and weights != "bnb":
        raise SystemExit(f"bad recipe {recipe!r}: Unsloth quantizes with bitsandbytes at load; use bnb/unsloth")
    options = {}
    for pair in filter(None, query.split("&")):
        key, _, value = pair.partition("=")
        options[key] = _option_value(value)
    return weights, compiler, options


def _option_value(text: str):
    if "+" in text:
        return [_option_value(item) for item in text.split("+")]
    if text.isdigit():
        return int(text)
    try:
        return {"true": True, "false": False}[text]
    except KeyError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def build_model(name: str, weights: str, layers: int | None, compiler: str = "eager"):
    from memgraph import models

    overrides = {"num_hidden_layers": layers} if layers else {}
    model = models.build(name, dtype=torch.bfloat16, device="cuda", use_cache=False, **overrides)
    if compiler == "liger-gc":  # Liger patches the instance's modules and forward (before LoRA wraps them)
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    model.requires_grad_(False)
    if weights == "bnb":
        models.to_bnb_4bit(model)
    elif weights == "nf4":
        import memgraph

        memgraph.quantize_(model, "nf4")
    gc.collect()
    torch.cuda.empty_cache()
    return models.add_lora(model)


def saved_checkpoint(name: str, layers: int | None) -> Path:
    """A random-init bf16 checkpoint and a small tokenizer on disk (Unsloth loads models by path), saved once per
    model and layer count; concurrent recipes wait on a lock instead of writing it twice."""
    import fcntl

    root = Path(os.environ.get("BENCH_CHECKPOINTS_DIR", tempfile.gettempdir())) / "memgraph-checkpoints"
    path = root / f"{name}-{layers or 'all'}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").exists():
            from memgraph import models

            model = models.build(name, dtype=torch.bfloat16, device="cuda", use_cache=False,
                                 **({"num_hidden_layers": layers} if layers else {}))
            model.save_pretrained(path)
            del model
            torch.cuda.empty_cache()
            _tiny_tokenizer(model_config_path=path).save_pretrained(path)
    return path


def _tiny_tokenizer(model_config_path: Path):
    """A word-level tokenizer with the model's special tokens: the benchmark feeds token ids, never text."""
    from tokenizers import Tokenizer, models as token_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    vocab = {token: i for i, token in enumerate([*specials.values(), *"abcdefghijklmnopqrstuvwxyz"])}
    backend = Tokenizer(token_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials, model_max_length=1 << 20)


def build_unsloth(name: str, layers: int | None, seq: int):
    """Unsloth's documented QLoRA recipe on the same architecture, LoRA r=16 alpha 16 dropout 0 everywhere."""
    from unsloth import FastLanguageModel  # first: it patches transformers on import

    path = saved_checkpoint(name, layers)

    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=seq, dtype=torch.bfloat16,
                                                 load_in_4bit=True, fix_tokenizer=False)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=LORA_TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=0)
    # from_pretrained returns an eval-mode model, and Unsloth's (like HF's) gradient checkpointing acts only in
    # training mode: without this its step keeps every layer's activations.
    FastLanguageModel.for_training(model)
    gc.collect()
    torch.cuda.empty_cache()
    return model


def compile_model(model, compiler: str, options: dict):
    torch._dynamo.reset()
    if compiler in ("eager", "unsloth"):
        return model
    if compiler in ("eager-gc", "liger-gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # PEFT's recipe: the frozen embedding's output needs grad for GC
        return model
    if compiler == "inductor":
        budget = options.pop("activation_memory_budget", None)
        if budget is not None:
            torch._functorch.config.activation_memory_budget = float(budget)
        return torch.compile(model)
    if options.pop("host_embedding", False):  # the frozen input embedding in host memory (a model transform)
        import memgraph

        memgraph.offload_embeddings_(model)
        gc.collect()
        torch.cuda.empty_cache()
    return torch.compile(model, backend="memgraph", options=options)


def run_recipe(args, recipe: str) -> dict:
    weights, compiler, options = parse_recipe(recipe)
    if args.cap_gib:  # a smaller card: the allocator refuses beyond the cap (torch.OutOfMemoryError)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total)
    try:
        return _run_recipe(args, recipe, weights, compiler, options)
    except torch.OutOfMemoryError as error:
        if not args.cap_gib:
            raise
        # Where it ran out and how full the cap was: an allocation the cost model never predicted shows here.
        frames = traceback.extract_tb(error.__traceback__)[-8:]
        return {"recipe": recipe, "seq": args.seq, "cap_gib": args.cap_gib, "fits": False,
                "error": f"out of memory under the {args.cap_gib} GiB cap: {str(error).splitlines()[0][:200]}",
                "allocator": os.environ.get("PYTORCH_ALLOC_CONF"),
                "allocated_gib_at_error": torch.cuda.memory_allocated() / 2**30,
                "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "where": [f"{Path(f.filename).name}:{f.lineno} {f.name}: {(f.line or '').strip()[:160]}" for f in frames]}


def _run_recipe(args, recipe: str, weights: str, compiler: str, options: dict) -> dict:
    # Building, compiling and the first step hold the timing lock's shared side (unless --noisy-timing): another
    # recipe's timed steps then never share the host's cores with this one's compile (a short step is host-bound).
    untimed = contextlib.ExitStack()
    if not getattr(args, "noisy_timing", False):
        untimed.enter_context(untimed_gpu_work())
    try:
        if compiler == "unsloth":
            model = build_unsloth(args.model, args.layers, args.seq)
        else:
            model = build_model(args.model, weights, args.layers, compiler)
        model.train()  # every recipe trains in training mode (HF gradient checkpointing acts only there)
        ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(0))
        step_model = compile_model(model, compiler, options)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            loss = step_model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        torch.cuda.synchronize()
        started = time.perf_counter()
        first_loss = float(step())
        torch.cuda.synchronize()
        first_step_s = time.perf_counter() - started
    finally:
        untimed.close()
    with exclusive_gpu_timing():
        # The peak counts from the second step on. Replayed CUDA graphs (cudagraphs=true; the first step warms
        # them up, the second records them) allocate nothing: the memory a replay uses is what the recording
        # allocated in the graphs' pool, so a peak counted from the third step on misses every activation.
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        times, enqueue = [], []
        for _ in range(args.steps):
            torch.cuda.synchronize()
            started = time.perf_counter()
            last_loss = step()
            enqueue.append(time.perf_counter() - started)  # host time to issue the step (and any syncs in it)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        peak_bytes = torch.cuda.max_memory_allocated()
        reserved_bytes = torch.cuda.max_memory_reserved()
        if args.profile:  # one more step under the profiler (alone on the GPU): where its time goes, idle time
            Path(args.profile).write_text(json.dumps({"recipe": recipe, "seq": args.seq, **profile_step(step)},
                                                     indent=1))
        # The diagnostic steps below also hold the lock: run beside another recipe's timed steps, they would
        # take its GPU and host time.
        if getattr(args, "sync_report", None):  # where the host waits for the GPU (stalls the queue), and where
            try:                                # its time goes
                syncs = host_syncs(step)
                syncs.update(host_functions(step))
            except Exception as error:  # noqa: BLE001 - a diagnostic must not cost the measured row
                syncs = {"error": f"{type(error).__name__}: {error}"}
            Path(args.sync_report).write_text(json.dumps({"recipe": recipe, "seq": args.seq, **syncs}, indent=1))
        if args.peak_report:  # one more step, allocations recorded: what is alive at its peak, and who made it
            torch.cuda.memory._record_memory_history(max_entries=2_000_000)
            outside = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            report = peak_allocations(torch.cuda.memory._snapshot(), outside)
            torch.cuda.memory._record_memory_history(enabled=None)
            Path(args.peak_report).write_text(json.dumps({"recipe": recipe, "seq": args.seq, **report},
                                                         indent=1))
    step_s = statistics.median(times)
    row = {"recipe": recipe, "seq": args.seq, "peak_gib": peak_bytes / 2**30, "reserved_gib": reserved_bytes / 2**30,
           "tok_s": ids.numel() / step_s, "step_ms": step_s * 1e3,
           # enqueue_ms close to step_ms: the host (launches, syncs) sets the pace, not the GPU
           "enqueue_ms": statistics.median(enqueue) * 1e3, "compile_s": first_step_s - step_s,
           "first_loss": first_loss, "last_loss": float(last_loss), "allocator": os.environ.get("PYTORCH_ALLOC_CONF")}
    if args.cap_gib:
        row.update(cap_gib=args.cap_gib, fits=True)
    if compiler == "memgraph":
        import memgraph
        from memgraph.kernels._launch import fast_launch_enabled

        row["triton_launch"] = "direct" if fast_launch_enabled() else "JITFunction.run"  # MEMGRAPH_FAST_LAUNCH
        records = [r for r in memgraph.compiled_graphs() if r.plan is not None]
        if records:
            row.update(graphs=len(records), solve_s=sum(r.plan.solve_seconds or 0 for r in records),
                       rewrites=sorted({name for r in records for name in r.rewrites}),
                       fallbacks=sum(r.fallback is not None for r in records),
                       cache=[r.cache for r in records], notes=[n for r in records for n in r.notes])
            peaks = [r.plan.peak_bytes for r in records]
            if None not in peaks:
                # The plan predicts the step's graph; the optimizer's state lives beside it (counted as memgraph
                # fit counts it: state tensors per trainable parameter, in the parameter's dtype).
                from memgraph.fit import OPTIMIZERS

                state = OPTIMIZERS["adamw"] * sum(p.numel() * p.element_size() for p in model.parameters()
                                                  if p.requires_grad)
                row.update(predicted_graph_peak_gib=max(peaks) / 2**30, predicted_optimizer_state_gib=state / 2**30,
                           predicted_peak_gib=(max(peaks) + state) / 2**30)
            offloaded = [r.plan for r in records if r.plan.offloaded]
            if offloaded:
                from memgraph.cost_model.runtime import measured_host_link
                from memgraph.kernels.offload import host_pool_bytes

                # the link the plans were made with (measured once per machine, cached): what their transfer
                # times, and so what they chose to offload, rest on
                link = measured_host_link()
                row["host_link_gb_s"] = link / 1e9 if link else None
                row.update(offloaded=sum(len(p.offloaded) for p in offloaded),
                           predicted_host_gib=sum(p.host_bytes or 0 for p in offloaded) / 2**30,
                           host_gib=host_pool_bytes() / 2**30,  # pinned buffers held between steps
                           predicted_transfer_ms=sum(p.transfer_seconds or 0 for p in offloaded) * 1e3)
    return row


KERNEL_KINDS = (  # first match wins: a GPU kernel's name → what it does
    ("attention", ("attention", "attn", "flash", "_kv_kernel", "sum_partials")),
    ("nf4", ("nf4", "dequant")),
    ("lora", ("lora", "times_small", "times_cols", "cols_reduced")),
    ("cross_entropy", ("cross_entropy", "logsumexp")),
    ("embedding", ("gather_rows", "embedding")),
    ("matmul", ("gemm", "cutlass", "sm90", "sm80", "nvjet", "cublas", "matmul", "xmma")),
    ("copy", ("memcpy", "memset", "copy", "cat")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("fused elementwise", ("triton_",)),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)), "other")


def _is_host_copy(name: str) -> bool:
    lowered = name.lower()
    return "memcpy" in lowered and ("dtoh" in lowered or "htod" in lowered)


def _covered_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals (streams that overlap count once)."""
    return sum(end - start for start, end in _merged(intervals))


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals as disjoint sorted spans."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def exposed_spans(copies: list[tuple[float, float, str]], compute: list[tuple[float, float]]
                  ) -> list[tuple[float, float, str]]:
    """The parts of each copy (start, end, direction) during which no compute kernel ran: (start, end, direction),
    overlapping copies of one direction counted once."""
    cover = _merged(compute)
    found = []
    for direction in sorted({d for _, _, d in copies}):
        for start, end in _merged([(s, e) for s, e, d in copies if d == direction]):
            at = start
            for c_start, c_end in cover:
                if c_end <= at or c_start >= end:
                    continue
                if c_start > at:
                    found.append((at, c_start, direction))
                at = max(at, c_end)
                if at >= end:
                    break
            if at < end:
                found.append((at, end, direction))
    return found


def _copy_direction(name: str) -> str:
    return "DtoH" if "dtoh" in name.lower() else "HtoD"


def profile_step(step, top: int = 40) -> dict:
    """One step under torch.profiler: the step's wall time, the GPU time per kind of kernel, the largest kernels,
    and the share of the step the GPU spent in no kernel (time a faster host side or CUDA graphs could win)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall_s = time.perf_counter() - started
    kernels: dict[str, list[float]] = {}
    intervals, directed = [], []  # kernels' spans; host copies' spans with their direction
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.time_range.elapsed_us() > 0:
            kernels.setdefault(event.name, []).append(event.time_range.elapsed_us() / 1e6)
            span = (event.time_range.start, event.time_range.end)
            if _is_host_copy(event.name):
                directed.append((*span, _copy_direction(event.name)))
            else:
                intervals.append(span)
    host_copies = [(start, end) for start, end, _ in directed]
    directions = sorted({d for _, _, d in directed})
    busy_us = _covered_us(intervals + host_copies)
    exposed = exposed_spans(directed, intervals)
    begin = min((s for s, _ in intervals + host_copies), default=0.0)
    by_direction: dict[str, float] = {}
    for start, end, direction in exposed:
        by_direction[direction] = by_direction.get(direction, 0.0) + (end - start) / 1e6
    compute_us = _covered_us(intervals)
    by_kind: dict[str, float] = {}
    for name, times in kernels.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + sum(times)
    largest = sorted(kernels.items(), key=lambda item: -sum(item[1]))[:top]
    # Host side: which ops' calls cost the host the most (inclusive time, so a custom op's Python counts whole),
    # and their count: where a host-bound step's time goes. Profiler overhead inflates every call alike.
    host_ops = [event for event in profiler.key_averages() if event.cpu_time_total > 0]
    host_ops.sort(key=lambda event: -event.cpu_time_total)
    return {"wall_s": wall_s, "gpu_busy_s": busy_us / 1e6, "gpu_idle_share": 1 - busy_us / 1e6 / wall_s,
            # host<->device copies: their time, and the part of it no kernel ran beside (a transfer not hidden)
            "host_copy_s": sum(end - start for start, end in host_copies) / 1e6,
            "host_copy_exposed_s": (busy_us - compute_us) / 1e6,
            # which direction's copies were exposed (DtoH: forward's offloads; HtoD: backward's reloads), and the
            # longest exposed spans with their start in the step (ms after its first kernel): where a plan's
            # predicted overlap did not happen
            "host_copy_exposed_s_by_direction": by_direction,
            "host_copy_exposed_spans": [{"start_ms": (start - begin) / 1e3, "ms": (end - start) / 1e3,
                                         "direction": direction}
                                        for start, end, direction in sorted(exposed, key=lambda x: x[0] - x[1])[:top]],
            "first_host_copy_ms": {d: (min(s for s, _, dd in directed if dd == d) - begin) / 1e3 for d in directions},
            "last_host_copy_ms": {d: (max(e for _, e, dd in directed if dd == d) - begin) / 1e3 for d in directions},
            "kernel_s_by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
            "largest_kernels": [{"name": name[:160], "kind": kernel_kind(name), "calls": len(times),
                                 "total_s": sum(times)} for name, times in largest],
            "host_ops": [{"name": event.key[:160], "calls": event.count, "host_s": event.cpu_time_total / 1e6,
                          "self_host_s": event.self_cpu_time_total / 1e6} for event in host_ops[:top]]}


def host_syncs(step, top: int = 20) -> dict:
    """One step under ``torch.cuda.set_sync_debug_mode("warn")``: every call that makes the host wait for the GPU
    (``.item()``, a device-to-pageable copy, ``nonzero``...), grouped by the innermost frames that made it. A sync
    inside the step lets the GPU run dry while the host queues the next kernels: a host-bound step's idle time."""
    import traceback
    import warnings

    places: dict[str, int] = {}
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        frames = traceback.extract_stack()[:-2][-6:]
        place = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        places[place] = places.get(place, 0) + 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = original
    ranked = sorted(places.items(), key=lambda item: -item[1])
    return {"syncs": sum(places.values()), "places": [{"calls": n, "where": w} for w, n in ranked[:top]]}


def host_functions(step, top: int = 30) -> dict:
    """One step under cProfile: the Python functions the host spends its time in while issuing the step (a
    host-bound step's cost by place; the profiler's own overhead inflates every function alike)."""
    import cProfile
    import pstats

    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    step()
    profiler.disable()
    issued = time.perf_counter() - started
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return {"profiled_issue_ms": issued * 1e3,
            "host_functions": [{"where": f"{Path(file).name}:{line} {name}", "calls": calls, "own_ms": own * 1e3,
                                "cumulative_ms": cumulative * 1e3}
                               for (file, line, name), (_, calls, own, cumulative, _) in ranked]}


def peak_allocations(snapshot: dict, before_bytes: int, top: int = 40) -> dict:
    """The allocations alive at a recorded step's peak (bytes alive before recording started are
    ``before_bytes``: weights, optimizer state), largest first, each with the frames that allocated it."""
    events = [e for trace in snapshot["device_traces"] for e in trace]

    def replay(until: int) -> tuple[dict[int, dict], int, int]:
        """(live allocations after event ``until``, bytes alive then, index of the highest point so far)."""
        live: dict[int, dict] = {}
        current = peak = 0
        highest = -1
        for index, event in enumerate(events[:until + 1]):
            if event["action"] == "alloc":
                live[event["addr"]] = event
                current += event["size"]
                if current > peak:
                    peak, highest = current, index
            elif event["action"] == "free_completed" and event["addr"] in live:
                current -= live.pop(event["addr"])["size"]
        return live, current, highest

    _, _, highest = replay(len(events) - 1)
    at_peak, peak, _ = replay(highest)

    def frames(event: dict) -> list[str]:
        useful = [f for f in event.get("frames", []) if "torch/_" not in f["filename"] or "output_code" in f["filename"]
                  or f["filename"].startswith("/tmp")]
        return [f"{Path(f['filename']).name}:{f['line']} {f['name']}: "
                f"{linecache.getline(f['filename'], f['line']).strip()[:160]}" for f in useful[:5]]

    def generated_code_around(event: dict, lines: int = 40) -> list[str]:
        """The compiled graph's code around the allocation that made the peak (Inductor's buffer names and
        ``del`` lines: what was freed just before, what is still held)."""
        code = next((f for f in event.get("frames", []) if "output_code" in f["filename"]
                     or f["filename"].startswith("/tmp/torchinductor")), None)
        if code is None:
            return []
        first = max(1, code["line"] - lines)
        return [f"{n}: {linecache.getline(code['filename'], n).rstrip()[:200]}" for n in range(first, code["line"] + 8)]

    largest = sorted(at_peak.values(), key=lambda e: -e["size"])[:top]
    peak_event = events[highest] if highest >= 0 else {}
    return {"before_bytes": before_bytes, "peak_in_step_bytes": peak, "peak_bytes": before_bytes + peak,
            "alive_at_peak": len(at_peak), "peak_allocation": {"bytes": peak_event.get("size"),
                                                               "frames": frames(peak_event) if peak_event else []},
            "code_at_peak": generated_code_around(peak_event) if peak_event else [],
            "largest": [{"bytes": e["size"], "frames": frames(e)} for e in largest]}


def _write(args, rows: list[dict], recipes: list[str]) -> None:
    baseline = next((r for r in rows if r["recipe"] == (args.baseline or recipes[0]) and "tok_s" in r), None)
    if baseline:
        for row in rows:
            if "tok_s" in row:
                row["tok_s_vs_baseline"] = row["tok_s"] / baseline["tok_s"]
                row["peak_vs_baseline"] = row["peak_gib"] / baseline["peak_gib"]
    write_results(args.name, rows, model=args.model, batch=1, layers=args.layers or "all",
                  lora="r16 alpha16 dropout0 on every projection", baseline=baseline["recipe"] if baseline else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (smoke tests)")
    parser.add_argument("--recipes", default="bf16/eager,bf16/inductor,bf16/memgraph?solver=mincut")
    parser.add_argument("--name", default="pipeline_overhead", help="results file name")
    parser.add_argument("--baseline", default=None, help="recipe the ratios are taken against")
    parser.add_argument("--recipe-timeout", type=float, default=None, help="seconds per recipe")
    parser.add_argument("--parallel", type=int, default=1, help="recipes run at once (timed steps take turns)")
    parser.add_argument("--cache-dir", default=None, help="one compile cache for every recipe (default: a fresh "
                                                          "empty one per recipe)")
    parser.add_argument("--extra", default=None, help="JSON of fields added to every row")
    parser.add_argument("--cap-gib", type=float, default=None, help="cap GPU memory at this many GiB (a smaller "
                        "card): a step that does not fit gives a row with fits=false")
    parser.add_argument("--peak-report", default=None, help="JSON path: allocations alive at a recorded step's peak")
    parser.add_argument("--profile", default=None, help="JSON path (RECIPE is replaced by the recipe): GPU time "
                        "by kernel kind and the GPU's idle share over one profiled step")
    parser.add_argument("--sync-report", default=None, help="JSON path (RECIPE is replaced by the recipe): the "
                        "calls that make the host wait for the GPU during one step, by place, and the Python functions "
                        "the host spends a step's time in (cProfile)")
    parser.add_argument("--noisy-timing", action="store_true", help="let timed steps run while other recipes build "
                        "and compile (faster runs; host-bound steps then time slower)")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_e2e needs a CUDA GPU")
    if args.only:
        Path(args.row_out).write_text(json.dumps(run_recipe(args, args.only)))
        return
    recipes = args.recipes.split(",")
    for recipe in recipes:
        parse_recipe(recipe)  # fail before any GPU work on a typo
    extra = json.loads(args.extra) if args.extra else {}
    rows: list[dict | None] = [None] * len(recipes)

    def finished(index: int, row: dict) -> None:
        rows[index] = {**row, **extra}
        print_table([rows[index]])
        done = [r for r in rows if r is not None]
        _write(args, done, recipes)  # after every recipe: a later time-out keeps what was measured

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.parallel, 1)) as pool:
        futures = {pool.submit(run_in_process, args, recipe): i for i, recipe in enumerate(recipes)}
        for future in concurrent.futures.as_completed(futures):
            finished(futures[future], future.result())
    print_table([r for r in rows if r is not None])


def _file_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:120]


ALLOCATOR_CONF = "expandable_segments:True"


def run_in_process(args, recipe: str) -> dict:
    """One recipe in a fresh process: its row, or its error (exit code and the last lines it printed)."""
    # A fresh, empty compile cache per recipe unless one is shared: every recipe compiles cold (fair compile
    # times) while identical kernels within one compile are still shared, as in a user's first run.
    cache = args.cache_dir or tempfile.mkdtemp(prefix="memgraph-bench-cache-")
    environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
    # Every recipe gets the allocator Unsloth sets for itself on import: without expandable segments, a step that
    # fits a memory cap by its allocated bytes can still fail on the caching allocator's fragments.
    environment.setdefault("PYTORCH_ALLOC_CONF", ALLOCATOR_CONF)
    if parse_recipe(recipe)[1] == "unsloth":  # nothing outside the machine is reachable: no Hub, no statistics
        environment.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
    with tempfile.NamedTemporaryFile(suffix=".json") as row_file, tempfile.TemporaryFile("w+") as log:
        command = [sys.executable, __file__, "--only", recipe, "--row-out", row_file.name, "--model", args.model,
                   "--seq", str(args.seq), "--steps", str(args.steps)]
        if args.layers:
            command += ["--layers", str(args.layers)]
        if getattr(args, "cap_gib", None):
            command += ["--cap-gib", str(args.cap_gib)]
        if getattr(args, "peak_report", None):
            command += ["--peak-report", args.peak_report.replace("RECIPE", _file_safe(recipe))]
        if getattr(args, "noisy_timing", False):
            command += ["--noisy-timing"]
        if getattr(args, "profile", None):
            command += ["--profile", args.profile.replace("RECIPE", _file_safe(f"{args.model}-{recipe}-{args.seq}"))]
        if getattr(args, "sync_report", None):
            command += ["--sync-report",
                        args.sync_report.replace("RECIPE", _file_safe(f"{args.model}-{recipe}-{args.seq}"))]
        try:
            result = subprocess.run(command, env=environment, timeout=args.recipe_timeout, stdout=log,
                                    stderr=subprocess.STDOUT)
            error = None if result.returncode == 0 else f"exit code {result.returncode}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {args.recipe_timeout} s"
        log.seek(0)
        output = log.read()
        if error is None:
            return json.loads(Path(row_file.name).read_text())
        lines = [line for line in output.splitlines() if line.strip()]
        print(f"[{recipe}] failed: {error}\n" + "\n".join(lines[-15:]), flush=True)
        return {"recipe": recipe, "seq": args.seq, "error": f"{error}: {failure_reason(output)}".strip(": ")}


def failure_reason(output: str, limit: int = 400) -> str:
    """The last line of a failed recipe's output that names an error, from its start (the error's type and
    first sentences: an out-of-memory error says how much was asked for and how much was free)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "Error" in line or "error" in line), "")
    return reason if len(reason) <= limit else reason[:limit] + " ..."


if __name__ == "__main__":
    main()
