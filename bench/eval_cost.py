"""What the background evaluation costs: one version end to end, and the chat's speed while one runs.

    python bench/eval_cost.py                  # the bundled model, the shipped probes, default settings
    python bench/eval_cost.py --window-s 20    # shorter chat windows

On the bundled SmolLM2-135M-Instruct, with two published versions made of random LoRA weights in the
trainer's config (v1 on v0, v2 on v1; served as the app serves them, resident in the base engine):

- eval_seconds: `Evaluator.evaluate("v2")` on a fresh store, nothing else running: every shipped probe
  sampled `samples_per_prompt` times at temperature 1, each reply's KL to v0 and to its parent v1 scored,
  the replies embedded, the result stored. v2 is the general case (every round after the first has a
  parent other than v0, so both references are scored); eval_seconds_parent_v0 is the same for v1, whose
  parent is v0 (one reference). Goal: eval_seconds <= 120 (eval_seconds_goal). The evaluation's own
  timings (sampling, scoring, embedding) are in eval_phases_s; rss_before_eval_mb and
  peak_rss_after_eval_mb bracket its memory (the process's resident size before it, its peak after).
- chat_throughput_during_eval_vs_idle: `--chat-users` people chatting through the app's DecodeLoop (each
  streams a pair at the chat's default sampling, `--chat-max-new-tokens` per reply, one request after the
  other), tokens per second over a `--window-s` window while an evaluation runs beside it in the
  evaluator's niced worker thread, against the mean of two windows with no evaluation, one before and
  one after (the machine's speed drifts). Goal: at least 0.667.

Prints one JSON object. The store and the adapters live in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHAT_PROMPTS = [
    "What is the capital of France?", "Give me a tip for sleeping better.", "How do I boil an egg?",
    "Write a haiku about autumn.", "What is photosynthesis?", "Suggest a name for a cat.",
    "How can I learn to code?", "Explain gravity to a child.",
]
EVAL_SECONDS_GOAL = 120.0
THROUGHPUT_GOAL = 0.667


def parse_args(argv=None) -> argparse.Namespace:
    from playground.evaluation.defaults import DEFAULT_PROBES, DEFAULT_SAMPLES_PER_PROMPT
    from playground.serving.models import DEFAULT_CACHE_DIR

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--probes", default=str(DEFAULT_PROBES))
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES_PER_PROMPT, help="samples per probe")
    p.add_argument("--window-s", type=float, default=30.0, help="each chat throughput window")
    p.add_argument("--chat-users", type=int, default=2, help="people chatting at once (a pair each)")
    p.add_argument("--chat-max-new-tokens", type=int, default=64)
    p.add_argument("--skip-parent-v0", action="store_true", help="leave out eval_seconds_parent_v0 (saves ~2 min)")
    return p.parse_args(argv)


def publish_random_version(store, model, model_id: str, adapters_dir: Path, name: str, parent: str, seed: int):
    """A published version of random LoRA weights in the trainer's config, recorded in the store."""
    from safetensors.torch import save_file

    from bench.decode import random_adapter
    from playground.serving.adapters import publish

    weights, config = random_adapter(model, seed)

    def write(folder: Path) -> None:
        save_file(weights, str(folder / "adapter_model.safetensors"))
        config.save_pretrained(str(folder))

    folder = publish(adapters_dir, name, write, {"base_model_id": model_id, "parent": parent})
    store.record_version(name, model_id, parent, str(folder), {"parent": parent})


def chat_window(decode_loop, loaded, window_s: float, users: int, max_new_tokens: int) -> dict:
    """Tokens/s of `users` concurrent pair streams through the decode loop over one window."""
    from playground.serving.generation import SamplingSettings
    from playground.serving.prompting import render

    settings = SamplingSettings(max_new_tokens=max_new_tokens)  # the chat's default temperature and top-p
    prompts = [render(loaded.tokenizer, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    end = time.perf_counter() + window_s
    counts = [0] * users
    requests = [0] * users

    def user(i: int) -> None:
        k = 0
        while time.perf_counter() < end:
            prompt = prompts[(i + k * users) % len(prompts)]
            seeds = (1000 * i + 2 * k, 1000 * i + 2 * k + 1)
            produced = 0
            stream = decode_loop.stream(loaded.model, loaded.tokenizer, prompt, settings, seeds)
            try:
                for update in stream:
                    produced = sum(r.n_tokens for r in update.replies)
                    if time.perf_counter() >= end:
                        break
            finally:
                stream.close()
            counts[i] += produced
            requests[i] += 1
            k += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": round(sum(counts) / elapsed, 2), "tokens": sum(counts), "requests": sum(requests),
            "seconds": round(elapsed, 2)}


def _rss_mb() -> float:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from playground.evaluation.evaluator import EvalSettings, Evaluator
    from playground.serving.decode_loop import DecodeLoop
    from playground.serving.embeddings import load_embedder
    from playground.serving.generation import engine_for
    from playground.serving.models import load_model
    from playground.serving.policy import PolicyHolder
    from store import Store

    loaded = load_model(args.model, "cpu", args.cache_dir)
    engine = engine_for(loaded.model)
    started = time.perf_counter()
    embedder = load_embedder()
    embedder_load_s = time.perf_counter() - started
    out: dict = {"model": loaded.model_id, "backend": engine.backend if engine else "hf",
                 "threads": torch.get_num_threads(), "embedder_load_s": round(embedder_load_s, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = Store(tmp / "bench.db")
        store.ensure_base_version(loaded.model_id)
        for name, parent, seed in (("v1", "v0", 1), ("v2", "v1", 2)):
            publish_random_version(store, loaded.model, loaded.model_id, tmp / "adapters", name, parent, seed)
        policy = PolicyHolder(loaded, per_row_adapters=True)
        settings = EvalSettings(probes_path=args.probes, samples_per_prompt=args.samples)
        evaluator = Evaluator(store, policy, settings, embedder=embedder)

        def timed(version: str) -> tuple[float, dict]:
            row = evaluator.evaluate(version)
            if row["status"] != "succeeded":
                raise SystemExit(f"the evaluation of {version} failed: {row['error']}")
            metrics = json.loads(row["metrics_json"])
            return metrics["seconds"]["total"], metrics

        rss_before_mb = _rss_mb()
        eval_s, metrics = timed("v2")
        # ru_maxrss: the process's peak so far (the model, the embedder, and this evaluation at its largest).
        out.update(rss_before_eval_mb=round(rss_before_mb), peak_rss_after_eval_mb=round(_peak_rss_mb()))
        out.update(eval_seconds=round(eval_s, 1), eval_seconds_goal=EVAL_SECONDS_GOAL,
                   eval_phases_s=metrics["seconds"], eval_counts=metrics["counts"],
                   eval_sampling_tokens_per_s=metrics["tokens_per_s"])
        if not args.skip_parent_v0:
            out["eval_seconds_parent_v0"] = round(timed("v1")[0], 1)

        decode_loop = DecodeLoop()
        try:
            chat_window(decode_loop, loaded, 3.0, args.chat_users, args.chat_max_new_tokens)  # warm-up
            idle_before = chat_window(decode_loop, loaded, args.window_s, args.chat_users, args.chat_max_new_tokens)
            # A fresh evaluation in the background worker (other seeds: the earlier ones would be skipped).
            beside = Evaluator(store, policy, EvalSettings(probes_path=args.probes, samples_per_prompt=args.samples,
                                                           seed=1), embedder=embedder)
            try:
                beside.schedule("v2")
                deadline = time.monotonic() + 120
                while ((beside.status()["running"] or {}).get("phase") != "sampling"
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                during = chat_window(decode_loop, loaded, args.window_s, args.chat_users, args.chat_max_new_tokens)
                running = beside.status()["running"] or {}
                during["eval_still_running"] = running.get("version") == "v2"
                during["eval_samples_done"] = running.get("done")
            finally:
                beside.close()
            idle_after = chat_window(decode_loop, loaded, args.window_s, args.chat_users, args.chat_max_new_tokens)
        finally:
            decode_loop.close()
            # Let its thread finish its last step: exiting under a thread inside a torch op can abort.
            if decode_loop._thread is not None:
                decode_loop._thread.join(timeout=30)
        idle = statistics.mean([idle_before["tokens_per_s"], idle_after["tokens_per_s"]])
        out.update(chat_idle_before=idle_before, chat_during_eval=during, chat_idle_after=idle_after,
                   chat_throughput_during_eval_vs_idle=round(during["tokens_per_s"] / idle, 3),
                   chat_throughput_goal=THROUGHPUT_GOAL, chat_users=args.chat_users,
                   window_s=args.window_s)
        store.close()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
