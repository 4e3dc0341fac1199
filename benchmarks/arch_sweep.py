"""Every causal-LM architecture transformers knows, tiny and random, trained one step eagerly and through memgraph.

For each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: a tiny config (sizes shrunk generically), a
right-padded batch of two rows (an ``attention_mask``, labels -100 on the padding), one forward + backward in
float32 eagerly and with ``torch.compile(backend="memgraph")``; again at a second length (a recompile), and
optionally with PEFT LoRA on every linear layer. Verdicts per architecture:

  pass      loss and every gradient equal eager's (relative error below ``--tolerance``)
  mismatch  it trains but the loss or a gradient differs (the worst parameter is named)
  error     eager trains, memgraph raises (the error's last line)
  skipped   the tiny model cannot be built or does not train eagerly (not counted)

    python benchmarks/arch_sweep.py --codegen eager --out benchmarks/results/arch_sweep.json
    python benchmarks/arch_sweep.py --options '{"offload": "on", "solver": "offload-layers"}' --only llama,qwen2
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import meta  # noqa: E402

TINY = {  # attribute -> tiny value, applied where the config has the attribute (and to nested text configs)
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "model_dim": 64, "embed_dim": 64,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "ffn_hidden_size": 128, "hidden_dim": 128,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "num_decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "kv_channels": 16, "vocab_size": 256,
    "max_position_embeddings": 512, "n_positions": 512, "decoder_layers": 2, "encoder_layers": 2,
    "moe_intermediate_size": 32, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "shared_expert_intermediate_size": 64,
}
MAX_PARAMETERS = 20_000_000
RANDOM_WORDS = ("dropout", "pdrop", "jitter", "drop_prob", "dropout_rate")
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers", "decoder_layers",
                "encoder_layers", "num_blocks")
MAX_LAYERS = 4  # per-layer lists (layer_types...) keep one layer of each kind, up to this many layers
# Multi-head latent attention (DeepSeek-V2 style): consistent tiny ranks; head_dim follows the rotary part.
MLA = {"qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 32,
       "index_head_dim": 16, "index_n_heads": 2}
# State-space (Mamba) dims: heads x head dim must equal expand x hidden, small states.
SSM_HEAD_DIM = 16
SSM = {"state_size": 16, "mamba_d_state": 16, "ssm_state_size": 16, "mamba_dt_rank": 8, "time_step_rank": 8,
       "n_groups": 1, "mamba_n_groups": 1, "mamba_ngroups": 1, "chunk_size": 16, "mamba_chunk_size": 16}


def _read(config, name: str, default=None):
    """An attribute, also a per-layer one of a heterogeneous config (whose plain read raises)."""
    try:
        return getattr(config, name)
    except AttributeError:
        return default
    except Exception:  # noqa: BLE001 - AmbiguousGlobalPerLayerAttributeError
        reader = getattr(config, "_getattr_without_heterogeneous_validation", None)
        return reader(name, default) if reader else default


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shrunk_values(config, old: dict, vocab: int | None, outer_hidden: int | None = None) -> dict:
    """The tiny values of ``config``'s own (non-sub-config) attributes, as constructor keywords.
    ``outer_hidden``: the enclosing (text) model's original hidden size, which a sub-config's adapters match."""
    new: dict = {}
    for name, value in TINY.items():
        if _is_int(old.get(name)):
            new[name] = value
        elif isinstance(old.get(name), (list, tuple)) and old[name] and all(_is_int(v) for v in old[name]):
            new[name] = type(old[name])(value for _ in old[name])  # per layer (gemma3n's intermediate_size)
    hidden = new.get("hidden_size", TINY["hidden_size"])
    heads = new.get("num_attention_heads", TINY["num_attention_heads"])
    old_hidden = next((old[n] for n in ("hidden_size", "n_embd", "d_model", "dim", "model_dim", "embed_dim")
                       if _is_int(old.get(n))), None)
    old_layers = next((old[n] for n in LAYER_COUNTS if _is_int(old.get(n))), None)
    for name, value in old.items():  # aliases of the hidden size / layer count under other names
        if name in new or not _is_int(value):
            continue
        if (value in (old_hidden, outer_hidden) and any(w in name for w in ("embed", "embd", "hidden", "_dim"))
                or name.startswith("hidden_size") and value > hidden) and "layer" not in name:
            new[name] = hidden
        elif old_layers and value == old_layers and name in LAYER_COUNTS:
            new[name] = TINY["num_hidden_layers"]
    if _is_int(old.get("qk_rope_head_dim")):  # MLA
        for name, value in MLA.items():
            if _is_int(old.get(name)):
                new[name] = value
        if "head_dim" in old:
            new["head_dim"] = MLA["qk_rope_head_dim"]
        if "qk_head_dim" in old:
            new["qk_head_dim"] = MLA["qk_rope_head_dim"] + MLA["qk_nope_head_dim"]
        if _is_int(old.get("num_key_value_heads")):  # keys and values are per query head
            new["num_key_value_heads"] = heads
    elif "head_dim" in old and old["head_dim"] is None:
        new["head_dim"] = hidden // heads
    if "num_key_value_heads" in old and old["num_key_value_heads"] is None:
        new["num_key_value_heads"] = heads
    if old.get("num_experts_per_tok", 0) is None and any(_is_int(old.get(n)) for n in (
            "num_experts", "num_local_experts", "n_routed_experts")):
        new["num_experts_per_tok"] = TINY["num_experts_per_tok"]
    for name, value in old.items():  # other vocabularies (hashed n-grams, per-layer inputs, a decoder's own)
        if "vocab" in name and _is_int(value) and value > TINY["vocab_size"] and name not in new:
            new[name] = TINY["vocab_size"]
    for name in ("n_group", "num_expert_group", "n_groups_routed"):  # expert groups of the 4 tiny experts
        if _is_int(old.get(name)) and old[name] > 2:
            new[name] = 2
    if _is_int(old.get("topk_group")) and old["topk_group"] > 1:
        new["topk_group"] = 1
    if old.get("default_language", 0) is None and old.get("languages"):
        new["default_language"] = old["languages"][0]
    if old.get("is_decoder") is False and "add_cross_attention" not in old:
        new["is_decoder"] = True  # a causal LM's config that defaults to an encoder (reformer)
    if _is_int(old.get("rotary_dim")) and old["rotary_dim"] > hidden // heads:
        new["rotary_dim"] = hidden // heads // 2
    for name, value in SSM.items():
        if _is_int(old.get(name)):
            new[name] = value
    expand = next((old[n] for n in ("expand", "mamba_expand") if _is_int(old.get(n))), None)
    if expand:  # SSM heads: (count, head dim) attribute pairs
        for count, dim in (("mamba_n_heads", "mamba_d_head"), ("num_heads", "head_dim"),
                           ("n_mamba_heads", "mamba_headdim"), ("mamba_num_heads", "mamba_head_dim")):
            if _is_int(old.get(count)) and (_is_int(old.get(dim)) or old.get(dim) == "auto"):
                new[count], new[dim] = expand * hidden // SSM_HEAD_DIM, SSM_HEAD_DIM
                if _is_int(old.get("mamba_d_ssm")):  # their product, where stored
                    new["mamba_d_ssm"] = expand * hidden
    for name, value in old.items():
        if isinstance(value, float) and any(word in name for word in RANDOM_WORDS):
            new[name] = 0.0  # random masks and router jitter differ between two runs
    if vocab:  # special tokens out of the shrunk vocabulary: ids the random batch never draws (it draws 3..)
        for name, value in old.items():
            if not (name.endswith(("_token_id", "_token_ids", "_token_index")) or name == "padding_idx"):
                continue
            spare = {"pad": 0, "bos": 1, "eos": 2}.get(name.split("_")[0], 0)
            if _is_int(value) and value >= vocab:
                new[name] = spare
            elif isinstance(value, (list, tuple)) and any(_is_int(v) and v >= vocab for v in value):
                new[name] = type(value)(v if not _is_int(v) or v < vocab else spare for v in value)
    return new


def _layers(old: dict) -> tuple[list[int] | None, int | None]:
    """Which of the original layers to keep: one of each kind the per-layer lists (and per-layer overrides) name,
    at least ``TINY["num_hidden_layers"]`` and at most ``MAX_LAYERS``; None without per-layer lists."""
    count = next((old[n] for n in LAYER_COUNTS if _is_int(old.get(n))), None)
    if not count or count <= TINY["num_hidden_layers"]:
        return None, count
    lists = [v for v in old.values() if isinstance(v, (list, tuple)) and len(v) == count
             and not all(_is_int(x) for x in v)]  # kinds, not layer indices or per-layer sizes
    overrides = old.get("_per_layer_overrides") or {}
    if not lists and not overrides:
        return None, count
    kinds = [repr(([v[i] for v in lists], sorted(overrides.get(i, {}).items()))) for i in range(count)]
    keep = sorted({kinds.index(k) for k in kinds})[:MAX_LAYERS]
    for i in range(count):  # at least the tiny layer count
        if len(keep) >= TINY["num_hidden_layers"]:
            break
        if i not in keep:
            keep = sorted(keep + [i])
    if _is_int(old.get("num_kv_shared_layers")) and 0 < old["num_kv_shared_layers"] < count:
        keep = keep + keep  # the last layers reuse the K/V of earlier ones: one of each kind, then its sharer
    return keep, count


def _shrink(config, vocab: int | None = None, outer_hidden: int | None = None):
    """A tiny config of ``config``'s class: constructed again with the shrunk values so that the attributes its
    ``__post_init__`` derives (head dims, layer lists, per-layer overrides) are consistent with them."""
    import dataclasses

    from transformers import PretrainedConfig

    cls = type(config)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    names = set(vars(config)) | fields | set(cls.attribute_map)  # attribute_map: standard names of the fields
    old = {name: _read(config, name) for name in names if not name.startswith("_")}
    spec = vars(config).get("_heterogeneity_spec")
    if spec is not None:
        old["_per_layer_overrides"] = spec.per_layer_overrides
    subs = {name: value for name, value in old.items() if isinstance(value, PretrainedConfig)}
    text = subs.get("text_config") or subs.get("decoder")
    own_vocab = TINY["vocab_size"] if _is_int(old.get("vocab_size")) else None
    text_hidden = _read(text, "hidden_size") if text is not None else None
    tiny_subs = {}
    for name, value in subs.items():
        tiny_subs[name] = _shrink(value, own_vocab or vocab, text_hidden if value is not text else None)
    if own_vocab is None and text is not None:
        vocab = getattr(tiny_subs.get("text_config") or tiny_subs.get("decoder"), "vocab_size", vocab)
    new = _shrunk_values(config, old, own_vocab or vocab, outer_hidden)
    keep, count = _layers(old)
    if keep is not None:
        for name, value in old.items():
            indices = (isinstance(value, (list, tuple)) and any(w in name for w in ("layers", "idx", "_ids", "indices"))
                       and all(_is_int(v) and 0 <= v < count for v in value))
            if indices and len(value) == count:  # per layer, another layer's index (kv_source_layers)
                new[name] = type(value)(keep.index(value[i]) if value[i] in keep else j for j, i in enumerate(keep))
            elif indices:  # some layers' indices (index_layers, full_attn_idxs)
                new[name] = type(value)(keep.index(v) for v in value if v in keep)
            elif isinstance(value, (list, tuple)) and len(value) == count:
                new[name] = type(value)((new.get(name) or value)[i] for i in keep)
        for name in LAYER_COUNTS:
            if name in new or _is_int(old.get(name)) and old.get(name) == count:
                new[name] = len(keep)
        if _is_int(old.get("num_kv_shared_layers")) and 0 < old["num_kv_shared_layers"] < count:
            new["num_kv_shared_layers"] = len(keep) // 2
        elif old.get("num_kv_shared_layers") == count:  # every layer reuses another model's K/V
            new["num_kv_shared_layers"] = len(keep)
        if spec is not None:
            per_layer = {}
            for j, i in enumerate(keep):
                layer = spec.per_layer_overrides.get(i)
                if layer:
                    tiny_layer = _shrunk_values(config, dict(layer), None)
                    per_layer[j] = {k: tiny_layer.get(k, v) for k, v in layer.items()}
            new["per_layer_config"] = per_layer
    elif spec is not None:
        new["per_layer_config"] = {i: {k: _shrunk_values(config, dict(layer), None).get(k, v) for k, v in layer.items()}
                                   for i, layer in spec.per_layer_overrides.items()}
    keywords = {cls.attribute_map.get(name, name): value for name, value in new.items()  # aliases: their field
                if name in fields or name in cls.attribute_map or name == "per_layer_config"}
    keywords.update(tiny_subs)
    keywords.update({name: value for name, value in old.items() if name not in keywords and name in fields
                     and not isinstance(value, PretrainedConfig) and name not in ("transformers_version",)
                     and _is_plain(value)})
    try:
        tiny = cls(**keywords)
    except Exception:  # noqa: BLE001 - a class that rejects some keyword: shrink the defaults in place
        tiny = cls(**{k: v for k, v in keywords.items() if k in tiny_subs})
    for name, value in new.items():  # what the constructor did not take (or derived from larger values)
        if name != "per_layer_config" and _read(tiny, name) != value and name in old:
            with contextlib.suppress(Exception):
                setattr(tiny, name, value)
    return tiny


def _is_plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))


def tiny_config(model_type: str):
    from transformers import AutoConfig

    config = _shrink(AutoConfig.for_model(model_type))
    config.use_cache = False
    return config


def batch(vocab: int, length: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(3, min(vocab, 256), (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, length * 3 // 4:] = 0  # the second row right-padded
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def one_step(model, inputs) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return float(loss), {n.removeprefix("_orig_mod."): p.grad.detach().clone()
                         for n, p in model.named_parameters() if p.grad is not None}


GRADIENT_FLOOR = 1e-3  # of the model's largest gradient: below it a parameter's gradient is float32 noise


def worst_error(reference: dict, got: dict) -> tuple[float, str]:
    """Largest relative error over the parameters. A gradient that is zero in exact arithmetic (a key
    projection's bias under softmax, blt's unused paths) is noise in both runs: each parameter's scale is
    at least ``GRADIENT_FLOOR`` of the model's largest gradient."""
    worst, where = 0.0, ""
    floor = GRADIENT_FLOOR * max((g.abs().max().item() for g in reference.values()), default=0.0)
    for name, want in reference.items():
        have = got.get(name)
        if have is None:
            return float("inf"), f"{name}: no gradient"
        scale = max(want.abs().max().item(), floor)
        error = (have - want).abs().max().item() / scale if scale > 0 else (have - want).abs().max().item()
        if error > worst:
            worst, where = error, name
    return worst, where


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(*_):
        raise TimeoutError(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def sweep_one(model_type: str, args) -> dict:
    from transformers import AutoModelForCausalLM

    row: dict = {"model_type": model_type}
    try:
        config = tiny_config(model_type)
        with torch.device("meta"):  # sized first: a config the generic shrinking missed would exhaust memory
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if size > MAX_PARAMETERS:
            raise ValueError(f"the tiny config still has {size / 1e6:.0f}M parameters")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
        if args.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        if args.nf4:  # QLoRA: the frozen base layers to NF4 (eager and compiled both read the NF4 weights)
            import memgraph

            memgraph.quantize_(model, "nf4")
        vocab = int(getattr(model.config, "vocab_size", None) or getattr(model.config.get_text_config(), "vocab_size"))
        references = []
        for length in args.lengths:
            references.append(one_step(model, batch(vocab, length)))
    except Exception as error:  # noqa: BLE001 - an architecture the tiny config does not build or train
        return {**row, "verdict": "skipped", "reason": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    torch._dynamo.reset()
    options = {"codegen": args.codegen, "cache": False, **json.loads(args.options)}
    compiled = torch.compile(model, backend="memgraph", options=options)
    try:
        with time_limit(args.timeout):
            for length, (loss_ref, grads_ref) in zip(args.lengths, references):
                started = time.perf_counter()
                loss, grads = one_step(compiled, batch(vocab, length))  # a compile (first length), a recompile
                seconds = time.perf_counter() - started
                loss_error = abs(loss - loss_ref) / max(abs(loss_ref), 1e-12)
                grad_error, where = worst_error(grads_ref, grads)
                row[f"seq{length}"] = {"loss_rel_err": loss_error, "grad_rel_err": grad_error, "worst": where,
                                       "step_s": seconds}
                if loss_error > args.tolerance or grad_error > args.tolerance:
                    return {**row, "verdict": "mismatch", "reason": f"seq {length}: loss {loss_error:.1e}, "
                                                                    f"grad {grad_error:.1e} ({where})"}
    except Exception as error:  # noqa: BLE001
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        return {**row, "verdict": "error", "reason": last[:300]}
    return {**row, "verdict": "pass"}


# Failures investigated and found not to be memgraph's: attached to their rows as "explained".
EXPLAINED = {
    "doge": "torch.compile(backend='aot_eager') fails the same way (a view of a non-contiguous tensor in "
            "AOTAutograd's graphs): not memgraph's",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codegen", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--lengths", default="32,48", help="sequence lengths (the second one recompiles)")
    parser.add_argument("--lora", action="store_true", help="PEFT LoRA on every linear layer")
    parser.add_argument("--nf4", action="store_true", help="frozen linear layers to NF4 (memgraph.quantize_): with "
                        "--lora, QLoRA")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="relative error (float32 eager vs memgraph)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per architecture")
    parser.add_argument("--only", default=None, help="comma-separated model types")
    parser.add_argument("--options", default="{}", help='JSON of more backend options, e.g. \'{"offload": "on", '
                        '"solver": "offload-layers"}\' (offload is off on a CPU unless "on")')
    parser.add_argument("--out", default=None, help="JSON report path")
    args = parser.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from tqdm import tqdm

    names = args.only.split(",") if args.only else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    rows, started = [], time.perf_counter()
    progress = tqdm(names, desc="architectures")
    for name in progress:
        progress.set_postfix_str(name)
        rows.append(sweep_one(name, args))
        if rows[-1]["verdict"] in ("mismatch", "error") and name in EXPLAINED:
            rows[-1]["explained"] = EXPLAINED[name]
        tqdm.write(f"{name}: {rows[-1]['verdict']} {rows[-1].get('reason', '')}")
    counted = [r for r in rows if r["verdict"] != "skipped"]
    passed = sum(r["verdict"] == "pass" for r in counted)
    summary = {"architectures": len(rows), "trained_eagerly": len(counted), "passed": passed,
               "pass_rate": passed / len(counted) if counted else None,
               "mismatch": [r["model_type"] for r in counted if r["verdict"] == "mismatch"],
               "error": [r["model_type"] for r in counted if r["verdict"] == "error"],
               "seconds": time.perf_counter() - started}
    print(json.dumps(summary, indent=1))
    if args.out:
        import transformers

        note = (f"codegen={args.codegen!r}, batch 2 right-padded (the padding mask becomes the fused attention's "
                f"segments), lengths {args.lengths}, LoRA {'on every linear' if args.lora else 'off'}"
                f"{', frozen linears in NF4' if args.nf4 else ''}. Gradients "
                "that are zero in exact arithmetic are compared against 1e-3 of the model's largest gradient; "
                "router jitter is zeroed like dropout. 'skipped' = the generic tiny config does not build or train "
                "eagerly (not counted).")
        report = {"meta": meta(command=" ".join(sys.argv), codegen=args.codegen, lengths=args.lengths,
                               lora=args.lora, nf4=args.nf4, tolerance=args.tolerance, transformers=transformers.__version__,
                               note=note),
                  "summary": summary, "rows": rows}
        Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
