"""The CUDA path, checked on a GPU machine: a DPO round, publishing and loading a version, a sampled pair.

    PYTHONPATH=. python3 bench/cuda_check.py        # on a machine with an NVIDIA GPU; prints JSON

Nothing is downloaded: a tiny random Llama (tests/tiny.py) for the exact checks, and a random model of
SmolLM2-135M's shape (30 layers, 576 wide, 49152 tokens) for a round's time at realistic size. Checks:
- a round with float32 weights and `matmul_dtype: auto` (bf16 products on a GPU with bf16) and a round
  with bf16 weights (what `app.py --device auto` serves on such a GPU): the step-1 loss is ln 2 in both,
  every loss finite, only LoRA weights change;
- the adapter publishes, verifies (hashes, loads, finite logits) and merges on the GPU;
- `sample_pair` writes two replies on the GPU from the merged version.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainers.dpo import DPOConfig, save_adapter, train_dpo  # noqa: E402
from bench.fixtures import build_tiny_model, random_pairs  # noqa: E402


def lora_only_changed(before: dict, model) -> bool:
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in after.items()}
    return all(torch.equal(before[k], base[k]) for k in before if k in base)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def round_report(model, pairs, config) -> dict:
    sync()
    started = time.perf_counter()
    result = train_dpo(model, pairs, pairs[:4], config)
    sync()
    losses = [s["loss"] for s in result.steps]
    return {"seconds": round(time.perf_counter() - started, 3), "steps": len(losses),
            "step1_loss": losses[0], "step1_is_ln2": abs(losses[0] - math.log(2)) < 1e-6,
            "finite": all(math.isfinite(x) for x in losses), "final_loss": losses[-1],
            "held_out_after": result.eval_after, "result": result}


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from playground.serving.adapters import load_version, publish
    from playground.serving.generation import SamplingSettings, sample_pair

    # `--cpu`: a dry run of the small checks here, before spending GPU time.
    dry = "--cpu" in sys.argv
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA device (use --cpu for a dry run)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    report = {"gpu": None if dry else torch.cuda.get_device_name(0), "torch": torch.__version__}
    tmp = Path(tempfile.mkdtemp(prefix="cuda-check-"))
    folder = build_tiny_model(tmp / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = DPOConfig(epochs=2, batch_size=4, learning_rate=1e-2, lora_r=4, lora_alpha=8)

    for name, dtype in (("float32_weights_auto_bf16_products", torch.float32), ("bf16_weights", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        pairs = random_pairs(model.config.vocab_size, 16, seed=1, prompt=(3, 8), reply=(2, 12))
        out = round_report(model, pairs, config)
        out["lora_only_changed"] = lora_only_changed(before, out["result"].model)
        out["model_untouched"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        result = out.pop("result")
        report[name] = out

    # Publish, verify and merge the last round's adapter on the GPU, then sample a pair from it.
    model_id = str(folder)
    final = publish(tmp / "adapters", "v1", lambda path: save_adapter(result, path),
                    {"base_model_id": model_id, "parent": "v0", "algo": "dpo"})
    _, merged = load_version(model, final, model_id)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
                                           tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    *_, replies = sample_pair(merged, tokenizer, prompt, SamplingSettings(max_new_tokens=24), seeds=(1, 2))
    report["merged_on"] = str(next(merged.parameters()).device)
    report["sample_pair"] = [{"tokens": len(r.token_ids), "finish": r.finish_reason} for r in replies]

    if dry:
        print(json.dumps(report, indent=1, default=str))
        return 0
    # A round at SmolLM2-135M's size (random weights): 32 pairs of ~200 tokens, the default config.
    shape = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                        tie_word_embeddings=True, pad_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    big = LlamaForCausalLM(shape).to(device)
    big.config._attn_implementation = "sdpa"
    pairs = random_pairs(shape.vocab_size, 32, seed=2, prompt=(40, 80), reply=(60, 120))
    for name, cfg in (("smollm2_shape_round_default", DPOConfig()),
                      ("smollm2_shape_round_float32", DPOConfig(matmul_dtype="float32"))):
        out = round_report(big, pairs, cfg)
        out.pop("result")
        report[name] = out
    report["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
