"""What serving versions costs on a model the decode engine does not run (playground/serving/peft_host.py).

    python -m bench.peft_host                      # the bundled model, 10 versions, 64-token pairs
    python -m bench.peft_host --model PATH --versions 4 --tokens 32

The bundled model is one the engine does run; here it is decoded the way an unsupported model is: the
HF forward (`sample_pair(use_engine=False)`), each version either a merged copy of the weights (how such
models were served before) or an adapter on the PEFT host (one shared copy, rows naming their version).
Prints one JSON object:

- `rss_hosted_versions_vs_v0`: the process's memory with v0 and --versions hosted versions against v0
  alone (the decode-loop issue's goal for versions is at most 1.10);
- `merged_copy_mb`: what one merged copy's weights take (what each version cost before), for scale;
- `hosted_pair_vs_merged_pair`: tokens/s of a pair on a hosted version against a pair on its merged copy,
  same seeds, alternated --repeats times (PEFT adds each LoRA's two small products to every layer);
- `hosted_tokens_match_merged`: whether the two gave the same tokens.

The adapters are random, with the trainer's LoRA config and bfloat16-rounded values (bench/decode.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.decode import merged_copy, random_adapter, rss_mb  # noqa: E402

PROMPT = "Explain in a few sentences why the sky is blue."


def save_adapter(adapter, folder: Path) -> Path:
    from safetensors.torch import save_file

    weights, config = adapter
    folder.mkdir(parents=True)
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def time_pair(model, tokenizer, prompt_ids, tokens: int, seeds=(1, 2)) -> tuple[float, list]:
    """Tokens/s of one pair of `tokens` new tokens each (no end of turn: every step counts) on the HF forward."""
    from playground.serving.generation import SamplingSettings, sample_pair

    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=tokens)
    started = time.perf_counter()
    *_, last = sample_pair(model, tokenizer, prompt_ids, settings, seeds, stop_ids=set(), use_engine=False)
    return 2 * tokens / (time.perf_counter() - started), [r.token_ids for r in last]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peft_host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled")
    p.add_argument("--model-cache", default=None)
    p.add_argument("--versions", type=int, default=10)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    args = p.parse_args(argv)
    if args.versions < 1 or args.tokens < 1 or args.repeats < 1:
        p.error("--versions, --tokens and --repeats must be at least 1")
    return args


def main(argv=None) -> int:
    import torch

    from playground.serving.models import DEFAULT_CACHE_DIR, load_model
    from playground.serving.peft_host import PeftHost
    from playground.serving.prompting import render

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, "cpu", args.model_cache or DEFAULT_CACHE_DIR)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt_ids = render(tokenizer, [{"role": "user", "content": PROMPT}])
    with tempfile.TemporaryDirectory() as tmp:
        # Saved first and dropped, so that v0's memory holds none of them (bench/decode.py's helpers).
        folders = [save_adapter(random_adapter(model, seed), Path(tmp) / f"v{seed + 1}") for seed in range(args.versions)]
        gc.collect()
        v0_mb = rss_mb()
        host = PeftHost(model)
        for folder in folders:
            host.add(folder.name, folder)
        gc.collect()
        hosted_mb = rss_mb()
        merged = merged_copy(model, random_adapter(model, 0))  # v1's own weights, merged
        merged_mb = sum(p.numel() * p.element_size() for p in merged.parameters()) / 2**20

        hosted = host.version("v1")
        time_pair(hosted, tokenizer, prompt_ids, 4)  # warm both paths up
        time_pair(merged, tokenizer, prompt_ids, 4)
        ratios, same = [], True
        for _ in range(args.repeats):  # alternated, so a slow moment of the machine hits both
            hosted_tps, hosted_tokens = time_pair(hosted, tokenizer, prompt_ids, args.tokens)
            merged_tps, merged_tokens = time_pair(merged, tokenizer, prompt_ids, args.tokens)
            ratios.append(hosted_tps / merged_tps)
            same = same and hosted_tokens == merged_tokens

    print(json.dumps({
        "model": loaded.model_id, "versions": args.versions, "tokens": args.tokens,
        "v0_rss_mb": round(v0_mb, 1),
        "rss_hosted_versions_vs_v0": round(hosted_mb / v0_mb, 3),
        "merged_copy_mb": round(merged_mb, 1),
        "hosted_pair_tokens_per_s": round(hosted_tps, 1), "merged_pair_tokens_per_s": round(merged_tps, 1),
        "hosted_pair_vs_merged_pair": round(statistics.median(ratios), 3),
        "hosted_pair_vs_merged_pair_runs": [round(r, 3) for r in ratios],
        "hosted_tokens_match_merged": same,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
