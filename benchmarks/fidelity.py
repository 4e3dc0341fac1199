"""Training fidelity: does memgraph train as eager does? Two cases, same seeds and data order for every recipe.

``pretrained`` (the headline): real text that ships with Python (the standard library's ``.py`` files, byte-level
tokens, nothing downloaded; one file in ten held out by a hash of its name). A ~85M-parameter Llama-style model is
first pre-trained from random init in bf16 eager (saved, reused by later runs), then fine-tuned with QLoRA (r=16 on
every projection, bitsandbytes NF4 base) by each recipe: ``eager+bnb`` and ``memgraph`` (every feature on: NF4
matmuls, 4-bit K/V attention, chunked cross-entropy, the default planner). Reported: both training-loss curves,
the mean of the last 100 steps and the held-out loss at the end (rows: recipe, steps, last100_mean_loss,
heldout_loss). Rule (DESIGN.md): memgraph within 1% of eager+bnb on both.

``lora_b0``: HF Llama (4 layers, hidden 2048) + PEFT LoRA with PEFT's default init (B = 0: lora_A's first
gradients are exactly zero in eager), AdamW lr 1e-4, bf16, batch 2 x 1024, a fresh batch each step and a
repeated batch, for eager, Inductor, memgraph and memgraph with ``checkpoint`` + ``kv_bits=4``: the loss
trajectories side by side and whether the first step's lora_A gradients are exactly zero.

    python benchmarks/fidelity.py                    # both cases on a GPU; fidelity.json + fidelity.png
    python benchmarks/fidelity.py --smoke            # tiny, on the CPU: the whole script, no results written
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import results_dir, write_results  # noqa: E402

VOCAB = 256  # byte-level tokens


@dataclasses.dataclass
class Sizes:
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 2048
    seq: int = 512
    pretrain_steps: int = 2000
    pretrain_batch: int = 16
    pretrain_lr: float = 1e-3
    finetune_steps: int = 400
    finetune_batch: int = 8
    finetune_lr: float = 2e-4
    heldout_batches: int = 20
    b0_hidden: int = 2048
    b0_layers: int = 4
    b0_seq: int = 1024
    b0_steps: int = 60


SMOKE = Sizes(hidden=64, layers=2, heads=4, intermediate=128, seq=64, pretrain_steps=20, pretrain_batch=4,
              finetune_steps=12, finetune_batch=2, heldout_batches=2, b0_hidden=64, b0_layers=2, b0_seq=64,
              b0_steps=3)


# --- data: the standard library's source, byte-level ---
def stdlib_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, held-out bytes) as uint8 tensors: every .py file of this Python's standard library (tests
    and site-packages excluded), one file in ten held out by a hash of its relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, heldout = bytearray(), bytearray()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in relative:
            continue
        data = path.read_bytes()
        held = int(hashlib.sha256(relative.encode()).hexdigest(), 16) % 10 == 0
        (heldout if held else train).extend(data + b"\n")
    return torch.frombuffer(bytes(train), dtype=torch.uint8), torch.frombuffer(bytes(heldout), dtype=torch.uint8)


def batches(tokens: torch.Tensor, batch: int, seq: int, seed: int):
    """An endless stream of [batch, seq] windows at random offsets, the same for every recipe given the seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=generator)
        yield torch.stack([tokens[s:s + seq] for s in starts.tolist()]).long()


# --- models ---
def llama_config(hidden: int, layers: int, heads: int, intermediate: int, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1),
                       max_position_embeddings=max(seq, 2048), use_cache=False, tie_word_embeddings=False,
                       attn_implementation="sdpa")


def pretrained_model(sizes: Sizes, tokens: torch.Tensor, device: str, folder: Path):
    """The pre-trained bf16 model: loaded from ``folder`` when a run saved it, else trained here and saved."""
    from transformers import LlamaForCausalLM

    if (folder / "config.json").exists():
        print(f"pre-trained model: {folder}")
        return LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device), None
    torch.manual_seed(0)
    config = llama_config(sizes.hidden, sizes.layers, sizes.heads, sizes.intermediate, sizes.seq)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sizes.pretrain_lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(sizes.pretrain_steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(step / sizes.pretrain_steps, 1.0)))))
    losses = []
    stream = batches(tokens, sizes.pretrain_batch, sizes.seq, seed=1)
    started = time.perf_counter()
    for step in range(sizes.pretrain_steps):
        ids = next(stream).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % max(sizes.pretrain_steps // 10, 1) == 0:
            print(f"pre-train step {step}: loss {losses[-1]:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return model, losses


@torch.no_grad()
def heldout_loss(step_model, heldout: torch.Tensor, sizes: Sizes, device: str) -> float:
    stream = batches(heldout, sizes.finetune_batch, sizes.seq, seed=7)
    total = [float(step_model(input_ids=(ids := next(stream).to(device)), labels=ids).loss)
             for _ in range(sizes.heldout_batches)]
    return sum(total) / len(total)


def finetune(recipe: str, base_state: dict, config, tokens, heldout, sizes: Sizes, device: str) -> dict:
    """QLoRA fine-tuning of the pre-trained model by one recipe; the same data order and LoRA init for all."""
    from memgraph import models
    from transformers import LlamaForCausalLM

    torch._dynamo.reset()
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(base_state)
    model.requires_grad_(False)
    models.to_bnb_4bit(model)
    torch.manual_seed(0)  # the same LoRA init in every recipe
    model = models.add_lora(model)
    step_model = model
    if recipe == "memgraph":
        step_model = torch.compile(model, backend="memgraph", options={"kv_bits": 4})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=sizes.finetune_lr)
    stream = batches(tokens, sizes.finetune_batch, sizes.seq, seed=2)
    losses = []
    for step in range(sizes.finetune_steps):
        ids = next(stream).to(device)
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % max(sizes.finetune_steps // 8, 1) == 0:
            print(f"[{recipe}] fine-tune step {step}: loss {losses[-1]:.4f}", flush=True)
    tail = losses[-100:]
    return {"case": "pretrained", "recipe": recipe, "steps": len(losses), "last100_mean_loss": sum(tail) / len(tail),
            "heldout_loss": heldout_loss(step_model, heldout, sizes, device), "losses": losses}


def pretrained_case(sizes: Sizes, device: str, folder: Path) -> list[dict]:
    tokens, heldout = stdlib_corpus()
    print(f"corpus: {len(tokens):,} training bytes, {len(heldout):,} held out")
    model, pretrain_losses = pretrained_model(sizes, tokens, device, folder)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = model.config
    del model
    rows = [finetune(recipe, base_state, config, tokens, heldout, sizes, device) for recipe in ("eager+bnb", "memgraph")]
    eager = rows[0]
    for row in rows[1:]:
        row["last100_vs_eager"] = row["last100_mean_loss"] / eager["last100_mean_loss"] - 1
        row["heldout_vs_eager"] = row["heldout_loss"] / eager["heldout_loss"] - 1
    if pretrain_losses:
        rows.append({"case": "pretrained", "recipe": "pre-training (bf16 eager)", "steps": len(pretrain_losses),
                     "last100_mean_loss": sum(pretrain_losses[-100:]) / len(pretrain_losses[-100:]),
                     "losses": pretrain_losses})
    return rows


# --- the B = 0 case ---
B0_RECIPES = {
    "eager": None,
    "inductor": {},
    "memgraph": {"solver": "mincut"},
    "memgraph checkpoint kv4": {"solver": "checkpoint", "kv_bits": 4},
}


def b0_case(sizes: Sizes, device: str) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = llama_config(sizes.b0_hidden, sizes.b0_layers, max(sizes.b0_hidden // 128, 4), 4 * sizes.b0_hidden,
                          sizes.b0_seq)
    config.vocab_size = 32000 if device == "cuda" else VOCAB
    rows = []
    for variant in ("fresh", "repeated"):
        for recipe, options in B0_RECIPES.items():
            torch._dynamo.reset()
            torch.manual_seed(0)
            with torch.device(device):
                model = LlamaForCausalLM(config).to(torch.bfloat16)
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))  # PEFT's init: B = 0
            step_model = model if options is None else (
                torch.compile(model) if recipe == "inductor" else torch.compile(model, backend="memgraph",
                                                                              options=options))
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            generator = torch.Generator().manual_seed(3)
            fixed = torch.randint(0, config.vocab_size, (2, sizes.b0_seq), generator=generator)
            losses, first_a_zero = [], None
            for step in range(sizes.b0_steps):
                ids = (fixed if variant == "repeated" else torch.randint(0, config.vocab_size, (2, sizes.b0_seq),
                                                                         generator=generator)).to(device)
                loss = step_model(input_ids=ids, labels=ids).loss
                loss.backward()
                if step == 0:
                    first_a_zero = all(bool((p.grad == 0).all()) for n, p in model.named_parameters()
                                       if "lora_A" in n and p.grad is not None)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss))
            rows.append({"case": "lora_b0", "variant": variant, "recipe": recipe, "steps": len(losses),
                         "final_loss": losses[-1], "first_step_lora_a_grads_zero": first_a_zero, "losses": losses})
            print(f"[b0 {variant}] {recipe}: final loss {losses[-1]:.5f}, lora_A grads zero at step 0: "
                  f"{first_a_zero}", flush=True)
    for variant in ("fresh", "repeated"):
        eager = next(r for r in rows if r["variant"] == variant and r["recipe"] == "eager")
        for row in rows:
            if row["variant"] == variant:
                row["final_loss_minus_eager"] = row["final_loss"] - eager["final_loss"]
                row["max_abs_gap_to_eager"] = max(abs(a - b) for a, b in zip(row["losses"], eager["losses"]))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pretrained", None), ("lora_b0", "fresh"), ("lora_b0", "repeated")]
    panels = [(case, variant) for case, variant in panels if any(r["case"] == case for r in rows)]
    # Top: the curves. Bottom: each recipe's loss minus the reference's (eager), where the curves overlap.
    figure, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 7.5), squeeze=False)
    for column, (case, variant) in enumerate(panels):
        runs = [row for row in rows if row["case"] == case and row.get("variant") == variant
                and "pre-training" not in row["recipe"]]
        reference = next((row for row in runs if row["recipe"] in ("eager", "eager+bnb")), None)
        title = f"{case}" + (f", {variant} batches" if variant else ": QLoRA fine-tuning")
        for index, row in enumerate(runs):
            style = dict(label=row["recipe"], linewidth=0.9, color=f"C{index}")  # one colour per recipe, both rows
            axes[0, column].plot(row["losses"], **style)
            if reference is not None and row is not reference:
                axes[1, column].plot([a - b for a, b in zip(row["losses"], reference["losses"])], **style)
        axes[0, column].set(title=title, xlabel="step", ylabel="training loss")
        axes[1, column].set(title=f"{title}: minus {reference['recipe'] if reference else 'eager'}", xlabel="step",
                            ylabel="loss difference")
        for axis in axes[:, column]:
            axis.legend(fontsize=8)
            axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="pretrained,lora_b0")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU; writes nothing")
    parser.add_argument("--checkpoint", default=None, help="where the pre-trained model is saved / loaded "
                        "(default: a folder beside the results)")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--finetune-steps", type=int, default=None)
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes()
    if args.pretrain_steps:
        sizes.pretrain_steps = args.pretrain_steps
    if args.finetune_steps:
        sizes.finetune_steps = args.finetune_steps
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("fidelity needs a CUDA GPU (--smoke runs it tiny on the CPU)")
    folder = Path(args.checkpoint) if args.checkpoint else (
        Path("/tmp/memgraph-fidelity-smoke") if args.smoke else results_dir() / "fidelity_pretrained")
    cases = args.cases.split(",")
    rows = []
    if "pretrained" in cases:
        rows += pretrained_case(sizes, device, folder)
    if "lora_b0" in cases:
        rows += b0_case(sizes, device)
    for row in rows:
        print({k: v for k, v in row.items() if k != "losses"})
    if args.smoke:
        return 0
    write_results("fidelity", rows, sizes=dataclasses.asdict(sizes),
                  data="Python standard library .py files, byte-level; 1 in 10 files held out")
    plot(rows, results_dir() / "fidelity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
