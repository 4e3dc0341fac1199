"""Regenerate README.md's results section from the files in benchmarks/results (no hand-typed numbers).

Everything between the README's ``<!-- results:begin -->`` and ``<!-- results:end -->`` lines is replaced by
tables built from the results files that exist, each with the date and hardware its file records:
end to end against the rivals (``e2e_MODEL.json``), the step recipes (``offload.json``), the chunked
cross-entropy (``cross_entropy.json``), attention (``attention.json``, ``attention_masked.json``,
``attention_softcap.json``), the longest
context under a cap (``max_context.json``), the architecture sweep (``arch_sweep.json``) and a "which options
for which GPU" guide from ``memgraph fit`` answers (``fit_*.json``).

    python benchmarks/readme_results.py            # rewrite README.md
    python benchmarks/readme_results.py --check    # exit 1 if README.md is not what the results give
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR  # noqa: E402
from e2e import MODELS, label, markdown_table  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _load(folder: Path, name: str) -> Optional[dict]:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def _first(value):
    """Merged runs keep lists (or dicts) of what single runs keep once: the first entry."""
    while isinstance(value, (list, dict)) and value:
        value = value[0] if isinstance(value, list) else next(iter(value.values()))
    return value


def _meta_fields(meta) -> tuple[str, str, str, str]:
    """(GPU, dates, torch version, command) from any results file's meta, tolerating merged runs' lists."""
    if not isinstance(meta, dict):
        return "", "", "", ""
    hardware = meta.get("hardware", {})
    hardware = hardware if isinstance(hardware, dict) else _first(hardware)
    gpu = hardware.get("gpu", "CPU") if isinstance(hardware, dict) else str(hardware or "")
    dates = meta.get("date")
    dates = [dates] if isinstance(dates, str) else [d for d in (dates or []) if isinstance(d, str)]
    versions = _first(meta.get("versions", {})) if not isinstance(meta.get("versions"), dict) else meta["versions"]
    torch_version = versions.get("torch", "") if isinstance(versions, dict) else ""
    command = _first(meta.get("command", ""))
    return gpu, " to ".join(sorted({d[:10] for d in dates})), torch_version, command if isinstance(command, str) else ""


def _source(data: dict, name: str) -> str:
    """'(file, GPU, date, torch)' from a results file's meta."""
    gpu, when, torch_version, _ = _meta_fields(data.get("meta", {}))
    torch_part = f", torch {torch_version}" if torch_version else ""
    return f"_`{name}`: {gpu or 'CPU'}, {when or 'undated'}{torch_part}_"


def _number(value, digits=2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value and abs(value) < 0.01:
            return f"{value:.1e}"
        return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_number(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def e2e_section(folder: Path) -> Optional[str]:
    parts = []
    for model in MODELS:
        data = _load(folder, f"e2e_{model}.json")
        if data:
            notes = dict.fromkeys(f"- {label(r['recipe'])} at {r['seq']}: {r['note']}" for r in data["rows"]
                                  if r.get("note"))
            parts.append(f"**{model}** {_source(data, f'e2e_{model}.json')}\n\n{markdown_table(data['rows'])}"
                         + ("\n\n" + "\n".join(notes) if notes else ""))
    return "### End to end against the rivals (QLoRA r=16, batch 1)\n\n" + "\n\n".join(parts) if parts else None


def steps_section(folder: Path) -> Optional[str]:
    data = _load(folder, "offload.json")
    if not data:
        return None
    rows = [[r["seq"], label(r["recipe"]) if "memgraph" not in r["recipe"] else r["recipe"].split("?", 1)[1],
             r.get("peak_gib"), r.get("tok_s"), r.get("host_gib"), r.get("predicted_peak_gib"),
             str(r.get("measured") or "")[:16].replace("T", " ")]
            for r in data["rows"] if "peak_gib" in r]
    notes = dict.fromkeys(f"- {r['seq']}, {label(r['recipe'])}: {r['note']}" for r in data["rows"] if r.get("note"))
    return ("### Llama-3-8B QLoRA steps by plan (NF4, 4-bit K/V, chunked cross-entropy)\n\n"
            + _source(data, "offload.json") + "\n\n"
            + _table(["seq", "recipe options", "peak GiB", "tokens/s", "host GiB", "predicted GiB", "measured (UTC)"],
                     rows) + ("\n\n" + "\n".join(notes) if notes else ""))


def breakdown_section(folder: Path) -> Optional[str]:
    """The cost model's time of a planned step by phase and kind, against the target and the measured step."""
    data = _load(folder, "step_breakdown_llama3-8b.json")
    if not data:
        return None
    kinds = list(dict.fromkeys(kind for r in data["rows"] for phase in r["predicted_ms"].values() for kind in phase))
    rows = []
    for r in data["rows"]:
        plan = (r["solver"] + (f" @ {r['memory_budget']}" if r.get("memory_budget") else "")
                + (f" ({r['plan_options'].replace('&', ', ')})" if r.get("plan_options") else ""))
        by_kind = {kind: sum(phase.get(kind, 0.0) for phase in r["predicted_ms"].values()) for kind in kinds}
        busy = r.get("profiled_gpu_busy_ms")
        step = r.get("measured_step_ms")
        rows.append([r["seq"], plan, r.get("target_step_ms"), r["predicted_step_ms"],
                     sum(r["predicted_ms"]["recompute"].values()), *(by_kind[k] for k in kinds), step,
                     str(r.get("measured_at") or "")[:16].replace("T", " "), busy])
    header = ["seq", "plan", "target ms", "predicted ms", "of it recompute", *(f"{k} ms" for k in kinds),
              "measured ms", "measured (UTC)", "GPU busy ms (profile)"]
    return ("### Where a Llama-3-8B step's time goes (cost model; measured where a run exists)\n\n"
            + _source(data, "step_breakdown_llama3-8b.json") + " (planned on a CPU; measured columns from "
            "`e2e_llama3-8b.json` and `profiles/` on the GPU they name)\n\n"
            + _table(header, rows) + "\n\n"
            "- target ms: the step time the tokens/s targets allow (10,000 at 2048, 12,000 at 8192). predicted: "
            "the roofline time of every node once, plus the plan's recomputed nodes again (kinds summed over "
            "forward, backward and recompute).\n"
            "- GPU busy ms: kernel time (streams overlapping counted once) in a step profiled with "
            "`bench_e2e --profile`, from the file the row names (`profile`), which may be of an older run than "
            "the measured step; measured well above busy means the host, launching kernels, was the bound.")


def cross_entropy_section(folder: Path) -> Optional[str]:
    data = _load(folder, "cross_entropy.json")
    if not data:
        return None
    rows = [[r["seq"], r.get("impl", r.get("recipe")), r.get("fwd_bwd_ms"), r.get("peak_gib"), r.get("grad_rel_err")]
            for r in data["rows"] if r.get("case") == "op"]
    if not rows:
        return None
    return ("### Chunked lm_head + cross-entropy (the op, Llama-3 vocabulary)\n\n" + _source(data, "cross_entropy.json")
            + "\n\n" + _table(["seq", "implementation", "fwd+bwd ms", "peak GiB", "grad rel. error"], rows))


def launch_section(folder: Path) -> Optional[str]:
    data = _load(folder, "launch.json")
    if not data:
        return None
    triton = {r["op"]: r for r in data["rows"] if r.get("path") == "JITFunction.run"}
    rows = [[r["op"], _number(triton.get(r["op"], {}).get("host_us"), 1), _number(r["host_us"], 1),
             _number(r.get("speedup"), 2), {True: "yes", False: "no"}.get(r.get("identical"), "")]
            for r in data["rows"] if r.get("path") == "direct"]
    return ("### Host time per op: the direct launch path (`benchmarks/bench_launch.py`)\n\n"
            + _source(data, "launch.json") + "\n\n"
            + _table(["op", "µs, Triton's JITFunction.run", "µs, direct", "ratio", "same bits"], rows))


def cudagraphs_section(folder: Path) -> Optional[str]:
    data = _load(folder, "cudagraphs.json")
    if not data:
        return None
    failed = any(r.get("error") for r in data["rows"])
    rows = [[r["layers"], r["recipe"].split("?", 1)[1].replace("kv_bits=4&drop_logits=true&host_embedding=true&", ""),
             "yes" if r["cudagraphs"] else "no", "not measured" if r.get("peak_gib", 0) is None else r.get("peak_gib"),
             r.get("step_ms"), r.get("enqueue_ms"),
             r.get("offloaded")] + ([(r.get("error") or "")[:80]] if failed else []) for r in data["rows"]]
    header = ["layers", "recipe options", "CUDA graphs", "peak GiB", "step ms", "host ms to issue", "values offloaded"]
    return ("### CUDA graphs (`cudagraphs=True`), Llama-3-8B QLoRA at 2,048 tokens\n\n" + _source(data, "cudagraphs.json")
            + "\n\n" + _table(header + (["error"] if failed else []), rows))


def attention_section(folder: Path) -> Optional[str]:
    parts = []
    data = _load(folder, "attention.json")
    if data:
        rows = [[r["seq"], r["head_dim"], r["kv_bits"], r.get("kv_dequant", ""), r.get("backend", "triton"),
                 r.get("fwd_bwd_ms_cudagraph"), r.get("speedup_vs_sdpa_cudagraph"), r.get("speedup_vs_sdpa")]
                for r in data["rows"] if r["impl"] == "memgraph"]
        parts.append("GPU time from a CUDA graph, and eager (host-bound at short lengths). "
                     + _source(data, "attention.json") + "\n\n"
                     + _table(["seq", "head dim", "kv bits", "K/V dequant", "16-bit kernels", "fwd+bwd ms (graph)",
                               "x SDPA flash (graph)", "x SDPA flash (eager)"], rows))
    probe = _load(folder, "attention_cudnn_probe.json")
    if probe:
        rows = [[f"{r['heads']}/{r['kv_heads']}", r["seq"], r["head_dim"], r.get("triton_fwd_ms"),
                 r.get("cudnn_fwd_ms"), r.get("triton_bwd_ms"), r.get("cudnn_contig_bwd_ms"), r.get("triton_bwd_scratch_mib"),
                 r.get("cudnn_bwd_scratch_mib")] for r in probe["rows"] if "error" not in r]
        parts.append("The 16-bit kernels: memgraph's Triton against cuDNN's SDPA (what "
                     "`memgraph.kernels.attention.cudnn` runs where it applies; its backward on contiguous tensors). "
                     + _source(probe, "attention_cudnn_probe.json") + "\n\n"
                     + _table(["query/KV heads", "seq", "head dim", "Triton fwd ms", "cuDNN fwd ms", "Triton bwd ms",
                               "cuDNN bwd ms", "Triton bwd MiB", "cuDNN bwd MiB"], rows))
    masked = _load(folder, "attention_masked.json")
    if masked:
        rows = [[r["layout"], r["impl"], r["kv_bits"], r.get("fwd_bwd_ms"), r.get("speedup_vs_sdpa"),
                 r.get("error", "")] for r in masked["rows"]]
        parts.append("Packed and padded batches, against SDPA with the same boolean mask. "
                     + _source(masked, "attention_masked.json") + "\n\n"
                     + _table(["batch", "implementation", "kv bits", "fwd+bwd ms", "x SDPA", "error"], rows))
    capped = _load(folder, "attention_softcap.json")
    if capped:
        rows = [[r["seq"], r["head_dim"], r["impl"], r["kv_bits"], r.get("fwd_bwd_ms"), r.get("speedup_vs_hf_eager"),
                 r.get("peak_extra_gib"), r.get("error", "")] for r in capped["rows"]]
        parts.append("Soft-capped scores (Gemma 2, cap 50), against HF's eager attention (the path transformers "
                     "runs for them) and FlexAttention with a tanh score_mod. "
                     + _source(capped, "attention_softcap.json")
                     + "\n\n" + _table(["seq", "head dim", "implementation", "kv bits", "fwd+bwd ms", "x HF eager",
                                         "extra peak GiB", "error"], rows))
    return "### Fused attention (fwd+bwd, 32 query / 8 KV heads)\n\n" + "\n\n".join(parts) if parts else None


def max_context_section(folder: Path) -> Optional[str]:
    data = _load(folder, "max_context.json")
    if not data:
        return None
    rows = [[r["recipe"], r["cap_gib"], r.get("max_seq") or r.get("status", ""), r.get("min_failed_seq") or "-",
             r.get("predicted_max_seq") or "-"] for r in data["rows"]]
    notes = [f"- {r['recipe']}: {r['status']}" for r in data["rows"] if r.get("status") and r.get("max_seq")]
    return ("### Longest sequence under a memory cap\n\n" + _source(data, "max_context.json") + "\n\n"
            + _table(["recipe", "cap GiB", "longest probed that fit", "shortest probed that did not",
                      "predicted (memgraph fit)"], rows) + ("\n\n" + "\n".join(notes) if notes else ""))


def fidelity_section(folder: Path) -> Optional[str]:
    data = _load(folder, "fidelity.json")
    if not data:
        return None
    def loss(value) -> str:
        return f"{value:.5f}" if isinstance(value, float) else "-"

    def relative(value) -> str:
        return f"{value * 100:+.4f}%" if isinstance(value, float) else "-"

    pretrained = [[r["recipe"], r["steps"], loss(r.get("last100_mean_loss")), loss(r.get("heldout_loss")),
                   relative(r.get("last100_vs_eager")), relative(r.get("heldout_vs_eager"))]
                  for r in data["rows"] if r["case"] == "pretrained"]
    b0 = [[r["variant"], r["recipe"], r["steps"], loss(r["final_loss"]), f"{r['final_loss_minus_eager']:+.5f}",
           f"{r['max_abs_gap_to_eager']:.5f}", "yes" if r["first_step_lora_a_grads_zero"] else "no"]
          for r in data["rows"] if r["case"] == "lora_b0"]
    parts = ["### Training fidelity (`benchmarks/fidelity.py`, curves in `fidelity.png`)", _source(data, "fidelity.json")]
    if pretrained:
        parts.append("QLoRA fine-tuning of a pre-trained ~85M Llama-style model on the standard library's source "
                     "(byte-level, held-out files); relative differences to eager + bitsandbytes:\n\n"
                     + _table(["recipe", "steps", "last-100 mean loss", "held-out loss", "last-100 vs eager",
                               "held-out vs eager"], pretrained))
    if b0:
        parts.append("HF Llama (4 layers, hidden 2048) + PEFT LoRA, B = 0 at init, AdamW 1e-4, bf16, batch 2 x 1024:\n\n"
                     + _table(["batches", "recipe", "steps", "final loss", "minus eager", "largest gap to eager",
                               "step-0 lora_A grads exactly 0"], b0))
    return "\n\n".join(parts)


def arch_sweep_section(folder: Path) -> Optional[str]:
    parts = []
    for name, title in (("arch_sweep.json", "no LoRA"), ("arch_sweep_lora.json", "LoRA on every linear")):
        data = _load(folder, name)
        if not data:
            continue
        statuses: dict[str, int] = {}
        for row in data["rows"]:
            statuses[row["verdict"]] = statuses.get(row["verdict"], 0) + 1
        parts.append(f"{title}: {_source(data, name)}\n\n"
                     + _table(["verdict", "architectures"], sorted(statuses.items(), key=lambda kv: -kv[1])))
    if not parts:
        return None
    return ("### Every causal-LM architecture of transformers (tiny configs, padded batch, two lengths)\n\n"
            + "\n\n".join(parts))


def options_guide_section(folder: Path) -> Optional[str]:
    rows = []
    for path in sorted(folder.glob("fit_*.json")):
        data = json.loads(path.read_text())
        if "rows" not in data or "memory_label" not in data:
            continue
        for row in data["rows"]:
            rows.append([data["model"], data["memory_label"], data.get("setup", {}).get("weights", ""),
                         row["batch"], row["max_seq"], row.get("plan", ""), row.get("tok_s")])
    if not rows:
        return None
    return ("### Which options for which GPU (`memgraph fit`, predicted on a CPU)\n\n"
            + "Tokens/s are the cost model's roofline of an H100/H200-class GPU whatever the memory size: they "
              "compare plans, not cards.\n\n"
            + _table(["model", "memory", "weights", "batch", "longest seq", "best plan", "predicted tokens/s (H200)"],
                     rows))


def files_section(folder: Path) -> Optional[str]:
    """Every results file with its GPU, date and command: where the numbers not tabled above live."""
    rows = []
    for path in sorted(folder.glob("*.json")):
        gpu, when, _, command = _meta_fields(json.loads(path.read_text()).get("meta", {}))
        rows.append([f"`{path.name}`", gpu, when, f"`{command[:110]}`" if command else ""])
    return "### Every results file\n\n" + _table(["file", "GPU", "date", "command"], rows) if rows else None


SECTIONS: list[Callable[[Path], Optional[str]]] = [
    e2e_section, steps_section, breakdown_section, max_context_section, fidelity_section, cross_entropy_section,
    launch_section, cudagraphs_section, attention_section, arch_sweep_section, options_guide_section, files_section]


def results_markdown(folder: Path = RESULTS_DIR) -> str:
    sections = [text for section in SECTIONS if (text := section(folder))]
    header = ("Generated by `python benchmarks/readme_results.py` from `benchmarks/results/`; each table names "
              "its file, GPU and date. Peak memory is `torch.cuda.max_memory_allocated` after a warm-up step.")
    return "\n\n".join([header, *sections])


def updated_readme(text: str, folder: Path = RESULTS_DIR) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md needs the lines {BEGIN} and {END} around its results section")
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    return f"{before}{BEGIN}\n{results_markdown(folder)}\n{END}{after}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md differs from the results")
    parser.add_argument("--results", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    text = README.read_text()
    new = updated_readme(text, Path(args.results))
    if args.check:
        if new != text:
            print("README.md's results section is stale: run python benchmarks/readme_results.py")
            return 1
        return 0
    README.write_text(new)
    print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
