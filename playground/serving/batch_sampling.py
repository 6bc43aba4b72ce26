"""Sampling many prompts at once (the loop benchmark's on-policy data and evaluations).

The chat decodes one pair at a time; offline work batches many prompts per `generate` call, left-padded,
so each decode step reads the weights once for every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from playground.serving.generation import SamplingSettings, stop_token_ids

DEFAULT_BATCH_ROWS = 16  # rows per generate call: past this a CPU step stops being bound by weight reads


@dataclass
class Sample:
    prompt_index: int
    token_ids: list[int]  # the reply's tokens, the end-of-turn token included when it stopped
    text: str
    finish_reason: str  # 'stop' or 'length'


@torch.inference_mode()
def sample_many(model, tokenizer, prompts: list[list[int]], per_prompt: int, settings: SamplingSettings,
                seed: int, batch_rows: int = DEFAULT_BATCH_ROWS) -> list[Sample]:
    """`per_prompt` replies for each prompt (token ids), in prompt order; deterministic for a seed."""
    device = next(model.parameters()).device
    stops = sorted(stop_token_ids(tokenizer, model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prompts_per_call = max(1, batch_rows // per_prompt)
    torch.manual_seed(seed)
    samples: list[Sample] = []
    for start in range(0, len(prompts), prompts_per_call):
        chunk = prompts[start : start + prompts_per_call]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, prompt in enumerate(chunk):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
            temperature=settings.temperature, top_p=settings.top_p, top_k=0,
            max_new_tokens=settings.max_new_tokens, num_return_sequences=per_prompt, pad_token_id=pad,
            eos_token_id=stops,
        )
        for row, sequence in enumerate(out[:, width:].tolist()):
            tokens, reason = [], "length"
            for token in sequence:
                tokens.append(token)
                if token in stops:
                    reason = "stop"
                    break
            content = tokens[:-1] if reason == "stop" else tokens
            samples.append(Sample(start + row // per_prompt, tokens, tokenizer.decode(content, skip_special_tokens=True),
                                  reason))
    return samples
