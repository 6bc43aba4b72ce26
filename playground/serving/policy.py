"""The policy being served: a base model and the name of the live version.

A generation takes a `PolicySnapshot` when it starts and keeps it to the end, so a version switch
never happens mid-stream: requests that start after `set_live` get the new one. The lock only guards
the swap of one reference, so it never blocks for longer than that.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from playground.serving.models import LoadedModel

BASE_VERSION = "v0"


def version_order(name: str) -> tuple:
    """A sort key putting versions in the order they were made: "v2" before "v10"; names that are not
    vN after those, by name."""
    return (0, int(name[1:]), "") if name[1:].isdigit() else (1, 0, name)


@dataclass(frozen=True)
class PolicySnapshot:
    version: str
    # What to decode: the base model when `adapter` is set; else this version's own model: a merged copy, or
    # a `peft_host.HostedVersion` (its adapter on one shared copy of the weights, for models the engine
    # does not support).
    model: object
    tokenizer: object
    model_id: str
    # The version's LoRA, resident in the base model's decode engine under this name and applied per row
    # (one copy of the base weights for every version); None for v0 and for versions served merged.
    adapter: str | None = None
    # The adapter's weights and config (`engine.read_adapter`): whoever decodes registers them again if
    # the engine was rebuilt (a new engine starts with no adapters).
    lora: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


class PolicyHolder:
    def __init__(self, loaded: LoadedModel, per_row_adapters: bool = False):
        self.loaded = loaded
        # Serve versions as adapters on the base model's weights (only where a decode loop decodes them): on
        # its engine, or on a PEFT host for a model the engine does not support. The composition root turns
        # this on; otherwise each version is a merged copy of the weights.
        self.per_row_adapters = per_row_adapters
        self._lock = threading.Lock()
        self.base = PolicySnapshot(BASE_VERSION, loaded.model, loaded.tokenizer, loaded.model_id)
        self._live = self.base
        # Versions ready to serve without loading anything (v0, and each version promoted since the
        # start that is served as an adapter on the base engine): a blind arena turn decodes one of these
        # beside the live version.
        self._resident: dict[str, PolicySnapshot] = {BASE_VERSION: self.base}
        self._peft_host = None  # versions of a model the engine does not support (`peft_host`)

    def peft_host(self):
        """The PEFT host for this base model's versions, made on first use (never for a model the engine
        serves): every version an adapter on one shared copy of the weights (playground/serving/peft_host.py)."""
        from playground.serving.peft_host import PeftHost

        with self._lock:
            if self._peft_host is None:
                self._peft_host = PeftHost(self.loaded.model)
            return self._peft_host

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    def snapshot(self) -> PolicySnapshot:
        with self._lock:
            return self._live

    def set_live(self, snapshot: PolicySnapshot) -> None:
        with self._lock:
            self._live = snapshot
            if snapshot.adapter is not None or snapshot.version == BASE_VERSION:
                self._resident[snapshot.version] = snapshot

    def resident(self) -> dict[str, PolicySnapshot]:
        """Versions servable now on the base model's engine (with v0), by name."""
        with self._lock:
            return dict(self._resident)
