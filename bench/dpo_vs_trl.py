"""Time one DPO round of ours (trainers/dpo.py) against TRL 1.16's DPOTrainer, same data, same LoRA start.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/dpo_vs_trl.py

32 pairs of chat length on the bundled SmolLM2-135M (CPU, float32 weights): 32 prompts written below, two replies
each sampled by `playground.serving.generation.sample_pair` with fixed seeds (max_new_tokens 96), rendered with
the chat template; the shorter reply is the chosen one. Both trainers get the same token ids, the same
initial LoRA weights (saved once, loaded by both), the same hyperparameters (DPOConfig defaults: batch
size, epochs, learning rate and schedule, beta, max_length, clipping), and the reference is the base
model with the adapter disabled in both. With a fresh LoRA (B = 0) the policy starts as the reference, so
both first losses must be ln 2.

TRL's settings: its defaults (gradient checkpointing on, bf16 autocast, a reference forward every step,
tqdm, logging) took over 15 minutes for these 32 pairs; we time it with the settings that are fastest on
a CPU (below, TRL_FAST), in float32 and with bf16 autocast ('fast+bf16'), and the speedup is against
the faster of the two. Ours runs with DPOConfig's defaults (bf16 base products where the CPU has fast
bf16: `--matmul-dtype` changes that). The dataset goes in pre-tokenized
(`prompt_ids`/`chosen_ids`/`rejected_ids`, TRL's own format after its tokenisation step), so both train on
identical tokens and TRL's tokenisation is not counted against it.

A same-batch check runs first: one batch of 4 pairs, an adapter whose B matrices are non-zero (so the
loss is not ln 2), our packed forward + `dpo_loss` against TRL's `compute_loss` on its own collated batch:
the loss and the LoRA gradient norm must agree.

Other jobs on a shared machine slow a CPU run down a lot, and unevenly: `--repeats N` alternates ours and
TRL N times and reports the fastest of each (the least disturbed run).

Prints one JSON object: ours_s, trl_s, speedup, step1_loss_ours, step1_loss_trl, n_pairs, the settings.
`--pairs-cache FILE` keeps the sampled pairs between runs (sampling takes a few minutes).

Measured: docs/BENCHMARKS.md ("One DPO round against TRL") has the latest numbers and the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from trainers.dpo import DPOConfig, config_dict, train_dpo  # noqa: E402
from trainers.procenv import reexec_for_training  # noqa: E402
from trainers.pairs import PreferencePair  # noqa: E402

MAX_NEW_TOKENS = 96
PROMPTS = [
    "What is the capital of Australia, and why isn't it Sydney?",
    "Write a haiku about a cat watching rain.",
    "Explain recursion to a ten-year-old.",
    "Give me three tips for sleeping better.",
    "How do I reverse a list in Python?",
    "What causes the seasons on Earth?",
    "Suggest a name for a small bakery that sells sourdough.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What's the difference between weather and climate?",
    "Write a polite email declining a meeting invitation.",
    "How many legs does a spider have, and is it an insect?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "What is photosynthesis?",
    "Give me a quick recipe for scrambled eggs.",
    "Why is the sky blue?",
    "List five animals that live in the Arctic.",
    "What does HTTP stand for and what is it used for?",
    "Tell me a short joke about computers.",
    "How can I stay focused while studying?",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Explain what a black hole is in simple words.",
    "Write a two-line poem about the ocean.",
    "What are the primary colors?",
    "How do vaccines work?",
    "Recommend a good habit to start this week.",
    "What is the Pythagorean theorem?",
    "Describe a sunset to someone who has never seen one.",
    "Why do leaves change color in autumn?",
    "What is the difference between a list and a tuple in Python?",
    "Give me a motivational quote and explain it.",
    "How far is the Moon from the Earth?",
    "What should I pack for a weekend hiking trip?",
]
# TRL's fastest CPU settings found here: no gradient checkpointing (memory is plentiful, recomputation is
# pure cost), reference log-probs
# precomputed once instead of a reference forward every step, no workers, no eval, no checkpoints,
# no tqdm. padding_free is unavailable in TRL 1.16 (it warns and falls back to padding).
TRL_FAST = dict(
    gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, precompute_ref_log_probs=True,
    precompute_ref_batch_size=8, dataloader_num_workers=0, dataloader_pin_memory=False, eval_strategy="no",
    save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True, optim="adamw_torch",
)
TRL_VARIANTS = {
    "fast": {},
    # bf16 autocast: faster on a CPU with AVX512-BF16 (this one), the fair peer of our bf16 products.
    "fast+bf16": {"bf16": True},
    "fast+group_by_length": {"train_sampling_strategy": "group_by_length"},
    "no_precompute": {"precompute_ref_log_probs": False},
}


def build_pairs(loaded, cache: Path | None) -> list[PreferencePair]:
    from playground.serving.generation import SamplingSettings, sample_pair
    from playground.serving.prompting import render

    if cache is not None and cache.is_file():
        return [PreferencePair(**{k: tuple(v) for k, v in row.items()}) for row in json.loads(cache.read_text())]
    settings = SamplingSettings(temperature=0.8, top_p=0.95, max_new_tokens=MAX_NEW_TOKENS)
    pairs = []
    for i, prompt in enumerate(PROMPTS):
        prompt_ids = render(loaded.tokenizer, [{"role": "user", "content": prompt}])
        *_, replies = sample_pair(loaded.model, loaded.tokenizer, prompt_ids, settings, seeds=(2 * i, 2 * i + 1))
        a, b = (r.token_ids for r in replies)
        chosen, rejected = (a, b) if len(a) <= len(b) else (b, a)  # the rule: the shorter reply wins
        pairs.append(PreferencePair(tuple(prompt_ids), tuple(chosen), tuple(rejected)))
    if cache is not None:
        cache.write_text(json.dumps([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                                      "rejected_ids": p.rejected_ids} for p in pairs]))
    return pairs


def initial_adapter(model, config: DPOConfig, folder: Path) -> Path:
    """A fresh LoRA (seeded), saved once so that both trainers start from the same weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    get_peft_model(copy.deepcopy(model), lora).save_pretrained(folder)
    return folder


def run_ours(loaded, pairs, config: DPOConfig, adapter: Path) -> dict:
    started = time.perf_counter()
    result = train_dpo(loaded.model, pairs, [], config, init_adapter_dir=adapter)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "steps": result.steps}


def trl_trainer(loaded, pairs, config: DPOConfig, adapter: Path, settings: dict, out: str, callbacks=()):
    """TRL's DPOTrainer on a copy of the model, our hyperparameters, our initial LoRA weights."""
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        # Our pairs are token ids already; TRL's own tokenisation step would only re-derive them.
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    rows = [{"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids),
             "rejected_ids": list(p.rejected_ids)} for p in pairs]
    # A fresh fingerprint per run: TRL caches precomputed reference log-probs by dataset and model hash,
    # and a later run must not get them for free.
    dataset = Dataset.from_list(rows).map(lambda row: row, new_fingerprint=f"dpo-bench-{time.time_ns()}")
    args = TRLConfig(
        output_dir=out, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, num_train_epochs=config.epochs,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_schedule, warmup_steps=0,
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, beta=config.beta,
        loss_type=[config.loss], label_smoothing=config.label_smoothing, max_length=config.max_length,
        seed=config.seed, **settings,
    )
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    trainer = PretokenizedDPOTrainer(model=copy.deepcopy(loaded.model), args=args, train_dataset=dataset,
                                     processing_class=copy.deepcopy(loaded.tokenizer), peft_config=lora,
                                     callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout, where our JSON goes
    # The same initial LoRA weights as ours (TRL's own init draws them in another order). A precomputed
    # reference used the adapter disabled, so it does not depend on them.
    set_peft_model_state_dict(trainer.model, load_file(str(adapter / "adapter_model.safetensors")))
    return trainer


def run_trl(loaded, pairs, config: DPOConfig, adapter: Path, overrides: dict) -> dict:
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append(dict(logs, step=state.global_step))

    settings = dict(TRL_FAST, **overrides)
    steps = Steps()
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        trainer = trl_trainer(loaded, pairs, config, adapter, settings, out, callbacks=[steps])
        init_s = time.perf_counter() - started
        trainer.train()
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "init_s": init_s, "steps": steps.logs, "settings": settings}


def same_batch_check(loaded, pairs, config: DPOConfig, adapter: Path, folder: Path, b_scale: float = 0.02) -> dict:
    """Loss and LoRA gradient norm of one batch, ours vs TRL's compute_loss, from a non-trivial adapter
    (LoRA B drawn with standard deviation b_scale)."""
    from peft import PeftModel

    from trainers.dpo import dpo_loss, pack_pairs, pair_logps

    # Non-zero B matrices: the policy differs from the reference, so the loss is not ln 2.
    torch.manual_seed(1)
    policy = PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(adapter), is_trainable=True)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, b_scale)
    policy.save_pretrained(folder)
    batch = pairs[: config.batch_size]

    policy.eval()
    rows = pack_pairs(batch, loaded.tokenizer.pad_token_id, "cpu", torch.float32)
    with torch.no_grad(), policy.disable_adapter():
        ref = pair_logps(policy, rows)
    losses, _, _ = dpo_loss(*pair_logps(policy, rows), *ref, config.beta, config.loss, config.label_smoothing,
                            rows.chosen_lengths, rows.rejected_lengths)
    losses.mean().backward()
    ours = [p.grad for p in policy.parameters() if p.requires_grad]

    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(loaded, batch, config, folder,
                              dict(TRL_FAST, precompute_ref_log_probs=False), out)
        trainer.model.eval()
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(batch))])
        loss_trl = trainer.compute_loss(trainer.model, inputs)
        loss_trl.backward()
        theirs = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    return {"loss_ours": losses.mean().item(), "loss_trl": loss_trl.item(),
            "grad_norm_ours": _norm(ours), "grad_norm_trl": _norm(theirs)}


def _norm(grads: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def main() -> None:
    # A scheduled round's malloc settings, for ours and TRL alike; OpenMP left to spin: nothing else runs.
    reexec_for_training(passive_openmp=False)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs-cache", type=Path, help="JSON file to keep the sampled pairs in between runs")
    parser.add_argument("--trl-variants", default="fast,fast+bf16", help=f"comma-separated, from {list(TRL_VARIANTS)}")
    parser.add_argument("--skip-trl", action="store_true", help="time ours only")
    parser.add_argument("--repeats", type=int, default=1, help="alternate ours and TRL N times, keep the best")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--matmul-dtype", default=DPOConfig.matmul_dtype, choices=["float32", "bfloat16", "auto"],
                        help="our round's DPOConfig.matmul_dtype (default: %(default)s, DPOConfig's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from playground.serving.models import load_model

    loaded = load_model("bundled", "cpu")
    # label_smoothing 0: TRL 1.16's 'sigmoid' ignores it, so the app's default cDPO term would make the two
    # losses differ by design (it costs nothing: the same forward passes, one more logsigmoid).
    config = DPOConfig(matmul_dtype=args.matmul_dtype, label_smoothing=0.0)
    started = time.perf_counter()
    pairs = build_pairs(loaded, args.pairs_cache)
    sampling_s = time.perf_counter() - started
    tokens = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]

    variants = [] if args.skip_trl else args.trl_variants.split(",")
    ours_runs, trl_runs = [], {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = initial_adapter(loaded.model, config, Path(tmp) / "init")
        check = None if args.skip_trl else same_batch_check(loaded, pairs, config, adapter, Path(tmp) / "check")
        for _ in range(args.repeats):
            ours_runs.append(run_ours(loaded, pairs, config, adapter))
            for name in variants:
                trl_runs[name].append(run_trl(loaded, pairs, config, adapter, TRL_VARIANTS[name]))
    ours = min(ours_runs, key=lambda run: run["seconds"])
    trl = {name: min(runs, key=lambda run: run["seconds"]) for name, runs in trl_runs.items()}

    report = {
        "n_pairs": len(pairs),
        "ours_s": round(ours["seconds"], 2),
        "ours_runs_s": [round(run["seconds"], 2) for run in ours_runs],
        "step1_loss_ours": ours["steps"][0]["loss"],
        "final_loss_ours": ours["steps"][-1]["loss"],
        "steps_ours": len(ours["steps"]),
    }
    if trl:
        best_name = min(trl, key=lambda k: trl[k]["seconds"])
        best = trl[best_name]
        report.update({
            "trl_s": round(best["seconds"], 2),
            "speedup": round(best["seconds"] / ours["seconds"], 2),
            "step1_loss_trl": best["steps"][0]["loss"] if best["steps"] else None,
            "final_loss_trl": best["steps"][-1]["loss"] if best["steps"] else None,
            "steps_trl": len(best["steps"]),
            "trl_variant": best_name,
            "trl_init_s": round(best["init_s"], 2),
            "trl_settings": best["settings"],
            "trl_variants_s": {k: [round(run["seconds"], 2) for run in runs] for k, runs in trl_runs.items()},
            "same_batch_check": check,
        })
        report["step1_loss_match"] = report["step1_loss_trl"] is not None and math.isclose(
            report["step1_loss_ours"], report["step1_loss_trl"], abs_tol=1e-4)
    report.update({
        "config": config_dict(config),
        "tokens_per_pair": {"mean": round(sum(tokens) / len(tokens), 1), "min": min(tokens), "max": max(tokens)},
        "sampling_s": round(sampling_s, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    })
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
