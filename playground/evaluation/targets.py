"""A version as the evaluation decodes and scores it: what serves it, and its logits along a given reply.

A version resolves to what the chat serves it with: v0 is `policy.base`, the live version is
`policy.snapshot()`, any other is loaded from its adapter folder as the loop loads one
(`adapters.version_snapshot`: resident in the base model's engine where it can be, on the PEFT host for a
model the engine does not run, else a merged copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from playground.serving.adapters import AdapterError, version_snapshot
from playground.serving.generation import engine_for
from playground.serving.policy import BASE_VERSION, PolicyHolder, PolicySnapshot
from trainers.logprobs import reply_mask, sequence_logprobs


@dataclass
class Target:
    """One version to sample and score: its snapshot, and the decode engine (its adapter registered) where
    the engine supports the model; None: the HF forward."""

    version: str
    snapshot: PolicySnapshot
    engine: object | None

    @classmethod
    def of(cls, snapshot: PolicySnapshot) -> Target:
        engine = engine_for(snapshot.model)
        if snapshot.adapter is not None:
            if engine is None:
                raise RuntimeError(f"{snapshot.version} is an adapter on the engine, and there is no engine")
            if snapshot.adapter not in engine.adapters:
                if snapshot.lora is None:
                    raise RuntimeError(f"the adapter {snapshot.adapter} is not loaded")
                # The engine was rebuilt since the version was made resident: load it again (unless the
                # chat's decode loop just did).
                try:
                    engine.add_adapter(snapshot.adapter, *snapshot.lora)
                except ValueError:
                    if snapshot.adapter not in engine.adapters:
                        raise
        return cls(snapshot.version, snapshot, engine)

    @property
    def adapter(self) -> str | None:
        return self.snapshot.adapter

    @property
    def tokenizer(self):
        return self.snapshot.tokenizer

    def fits_engine(self, n_positions: int) -> bool:
        return self.engine is not None and n_positions <= self.engine.max_positions

    @torch.inference_mode()
    def reply_logits(self, prompt_ids, reply_ids) -> torch.Tensor:
        """float32 [len(reply), V]: row t is the distribution reply token t was drawn from, given the
        prompt and the reply before it (teacher forcing; `Engine.score` or the HF forward)."""
        ids = list(prompt_ids) + list(reply_ids[:-1])
        start = len(prompt_ids) - 1
        if self.fits_engine(len(ids)):
            return self.engine.score(ids, adapter=self.adapter, start=start)
        self._check_hf()
        model = self.snapshot.model
        device = next(model.parameters()).device
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
        return out.logits[0, start:].float()

    @torch.inference_mode()
    def branch_logits(self, prompt_ids, replies: list) -> list[torch.Tensor]:
        """`reply_logits` of several replies to one prompt; on the engine in one forward, the prompt once
        (`Engine.score_branches`)."""
        longest = len(prompt_ids) + max((len(r) for r in replies), default=1) - 1
        if not self.fits_engine(longest):
            return [self.reply_logits(prompt_ids, reply) for reply in replies]
        branches = [list(reply[:-1]) for reply in replies]
        return self.engine.score_branches(list(prompt_ids), branches, adapter=self.adapter)

    @torch.inference_mode()
    def reply_logprobs(self, prompt_ids, replies: list) -> list[float]:
        """log p(reply | prompt) under this version for each reply, summed over its tokens: from the
        engine's logits (the prompt once for all replies), else the trainer's log-prob helper."""
        if self.fits_engine(len(prompt_ids) + max((len(r) for r in replies), default=1)):
            out = []
            for reply, logits in zip(replies, self.branch_logits(prompt_ids, replies)):
                picked = torch.tensor(list(reply), device=logits.device)[:, None]
                out.append(float(torch.log_softmax(logits, dim=-1).gather(-1, picked).sum()))
            return out
        self._check_hf()
        model = self.snapshot.model
        device = next(model.parameters()).device
        out = []
        for reply in replies:
            ids = torch.tensor([list(prompt_ids) + list(reply)], device=device)
            mask = reply_mask(len(prompt_ids), ids.shape[1], device=device)
            out.append(float(sequence_logprobs(model, ids, mask)[0]))
        return out

    def _check_hf(self) -> None:
        if self.adapter is not None:  # the HF forward of the base model would score v0, not this version
            raise ValueError(f"{self.version} can only be scored by the engine, and this sequence does not fit it")


def resolve(policy: PolicyHolder, store, version: str) -> PolicySnapshot:
    """What serves `version` of the policy's model (see the module docstring). Raises AdapterError."""
    if version == BASE_VERSION:
        return policy.base
    live = policy.snapshot()
    if live.version == version:
        return live
    row = store.version(policy.model_id, version)
    if row is None:
        raise AdapterError(f"no version {version} for {policy.model_id}")
    if not row.get("adapter_dir"):
        raise AdapterError(f"{version} has no adapter folder recorded")
    return version_snapshot(policy, version, Path(row["adapter_dir"]))
