"""Speed of one teacher-distillation healing step (issue 13): the checkpointed LM-head path against the fused one.

SmolLM2-135M (``demo``) with the 7 layers of the repair evidence removed ([14, 17, 13, 15, 12, 25, 16]),
LoRA r8 / alpha 16 / dropout 0.05 on every projection (``configs/pieces/lora_distill.yaml``), the dense
model as the frozen teacher; one step = teacher forward, student forward, LM-head losses, backward, on a
batch of 4 x 128 tokens (the recipes' micro-batch). Variants run interleaved, ``--rounds`` times each, so
load on the shared CPU hits them alike; the JSON keeps every time and the median tokens/s.

Variants: ``lm`` = the Hugging Face causal-LM loss; ``lm_fused`` = the same loss through the fused
LM-head path (``alpha=0``; what LM-loss healing runs since the fused path); ``checkpointed`` =
forward KL with each LM-head chunk inside ``torch.utils.checkpoint`` (the path before the fused one);
``fused`` = the fused path (``lightning_prune.teacher.head_losses``) at the default chunking; ``fused_cN``
= the fused path with ``chunk_tokens=N``; ``full_fused`` = full-parameter training (no adapters) with the
fused path.

Usage: OMP_NUM_THREADS=1 python benchmarks/teacher_kd_speed.py [--rounds 3] [--variants lm,checkpointed,fused]
"""

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from repair_evidence import shown
from report import ROOT

REMOVED = [14, 17, 13, 15, 12, 25, 16]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round (after one warm-up step)")
    parser.add_argument("--variants", default="lm,checkpointed,fused")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "teacher_kd_speed.json"))
    return parser.parse_args()


def pruned_student(dense: torch.nn.Module, lora: bool) -> torch.nn.Module:
    from peft import LoraConfig

    from lightning_prune.lora import attach_adapters

    student = copy.deepcopy(dense)
    keep = [layer for i, layer in enumerate(student.model.layers) if i not in REMOVED]
    student.model.layers = torch.nn.ModuleList(keep)
    student.config.num_hidden_layers = len(keep)
    for index, layer in enumerate(keep):
        layer.self_attn.layer_idx = index
    if not lora:
        return student.train().requires_grad_(True)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    return attach_adapters(student, config, quantized=False, gradient_checkpointing=False).train()


def main() -> None:
    args = arguments()
    from lightning_prune.model.loading import load_model
    from lightning_prune.results import package_versions
    from lightning_prune.sparsity.masks import unwrap_model
    from lightning_prune.teacher import final_hidden, head_losses

    torch.manual_seed(0)
    dense = load_model("demo", dtype="float32")[0]
    teacher = copy.deepcopy(dense).eval().requires_grad_(False)
    students = {"lora": pruned_student(dense, lora=True)}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v.startswith("full") for v in variants):
        students["full"] = pruned_student(dense, lora=False)
    del dense
    batch = torch.randint(0, teacher.config.vocab_size, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))

    def step(variant: str) -> None:
        model = students["full" if variant.startswith("full") else "lora"]
        model.zero_grad(set_to_none=True)
        if variant == "lm":
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            return
        plain = unwrap_model(model)
        if variant == "lm_fused":
            head_losses(final_hidden(plain, batch), plain.get_output_embeddings(), input_ids=batch, alpha=0.0)[0].backward()
            return
        with torch.no_grad():
            teacher_hidden = final_hidden(teacher, batch)
        options = {"fused": variant != "checkpointed"}
        if "_c" in variant:
            options["chunk_tokens"] = int(variant.rsplit("_c", 1)[1])
        elif variant == "checkpointed":
            options["chunk_tokens"] = 1024  # the recipes' setting
        loss = head_losses(
            final_hidden(plain, batch),
            plain.get_output_embeddings(),
            teacher_hidden=teacher_hidden,
            teacher_head=teacher.get_output_embeddings(),
            **options,
        )[0]
        loss.backward()

    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for variant in variants:
        step(variant)  # warm-up
    for _ in range(args.rounds):
        for variant in variants:
            for _ in range(args.steps):
                start = time.perf_counter()
                step(variant)
                seconds[variant].append(time.perf_counter() - start)
            print(variant, f"{seconds[variant][-1]:.2f} s", flush=True)
    tokens = args.batch_size * args.seq_len
    record = {
        "settings": {
            **vars(args),
            "output": shown(Path(args.output)),
            "threads": torch.get_num_threads(),
            "removed": REMOVED,
            "load": os.getloadavg()[0],
        },
        "versions": package_versions(),
        "variants": {
            v: {
                "seconds": [round(x, 3) for x in xs],
                "tokens_per_second": round(tokens / statistics.median(xs), 1),
                # contention only slows a step down: the fastest step is the least disturbed estimate
                "best_tokens_per_second": round(tokens / min(xs), 1),
            }
            for v, xs in seconds.items()
        },
    }
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    for v, r in record["variants"].items():
        print(f"{v}: {r['tokens_per_second']} tokens/s (median of {len(r['seconds'])}), best {r['best_tokens_per_second']}")


if __name__ == "__main__":
    main()
