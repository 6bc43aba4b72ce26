"""Versions of a model the decode engine does not support: every version's LoRA on one PEFT model over
one shared copy of the base weights, each row of a batch naming its version.

The engine (`playground/serving/engine`) serves versions as unmerged adapters on its own copy of the
weights, but only for the architectures it reproduces exactly. For any other model a version used to be
a merged copy of the whole model: ten versions, eleven copies. Here the versions are adapters of one
`peft.PeftModel` instead, decoded through PEFT's mixed-adapter batches (`adapter_names`, one per row;
`"__base__"` for a v0 row), so a version costs the size of its adapter, as on the engine.

The PeftModel wraps a structural copy of the base model whose parameters and buffers *are* the base
model's tensors (`shared_copy`): PEFT swaps LoRA layers into the modules it wraps, and doing that to the
served base model itself would change what v0, the trainers and the evaluation see. No weight is copied.

PEFT applies `adapter_names` through forward hooks it registers on the shared LoRA layers for the length
of one call, so two calls at once would see each other's hooks; a call whose rows are all one version
uses PEFT's plain forward on that adapter (much faster), which switches the model's active adapter. So
every forward holds the host's lock, except one whose rows are all v0: that is the served model itself.
Requests on these models are decoded by `generation.sample_pair` on their callers' threads (the shared
decode loop needs the engine), so they take turns step by step rather than sharing a step.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BASE_ROW = "__base__"  # PEFT's adapter name for a row decoded by the base model alone


class HostError(RuntimeError):
    """An adapter the host could not load; nothing of it stays loaded."""


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model`'s modules that holds the very same parameter and buffer tensors (no weight is
    copied): wrapping its layers leaves `model` as it was, and changing a weight of one changes both."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class PeftHost:
    """One PeftModel over the base model's weights, holding any number of versions' adapters."""

    def __init__(self, base_model):
        self.base_model = base_model
        self._peft = None  # made with the first adapter (a PeftModel needs one)
        self._names: set[str] = set()
        self._active: str | None = None  # the PeftModel's active adapter (its plain forward's)
        # Held by every forward and by every change of the adapters (see the module docstring).
        self._lock = threading.RLock()

    @property
    def adapters(self) -> set[str]:
        with self._lock:
            return set(self._names)

    def add(self, name: str, folder: Path) -> None:
        """Load the PEFT adapter in `folder` under `name` (a no-op when `name` is loaded). Raises HostError."""
        from peft import PeftModel

        if not name or "." in name or name == BASE_ROW:
            raise ValueError(f"{name!r} cannot name an adapter (no dots, not {BASE_ROW})")
        with self._lock:
            if name in self._names:
                return
            try:
                if self._peft is None:
                    self._peft = PeftModel.from_pretrained(shared_copy(self.base_model), str(folder), adapter_name=name)
                    self._active = name  # from_pretrained makes it the active one
                else:
                    self._peft.load_adapter(str(folder), adapter_name=name)
                self._peft.eval()  # PEFT refuses adapter_names in training mode
            except Exception as exc:  # peft raises many kinds: size mismatch, bad config, unreadable tensors
                self._drop(name)
                raise HostError(f"{Path(folder).name} does not load onto this base model: {exc}") from exc
            self._names.add(name)
        log.info("adapter %s loaded on the PEFT host (%d resident)", name, len(self._names))

    def remove(self, name: str) -> None:
        with self._lock:
            if name in self._names:
                self._names.discard(name)
                self._drop(name)

    def _drop(self, name: str) -> None:
        """Delete a (possibly half-loaded) adapter from the PeftModel; the last one goes with the model."""
        if self._peft is None:
            return
        if not self._names:
            self._peft = self._active = None  # nothing else lives on it: the LoRA layers and module copy go
            return
        try:
            self._peft.delete_adapter(name)
        except (ValueError, KeyError, AttributeError):
            pass  # it never got as far as being registered
        # Deleting the active adapter makes PEFT pick another: ask for the one wanted on the next forward.
        self._active = None

    def forward(self, adapter_names: list[str], **kwargs):
        """The model's forward with row i decoded by adapter `adapter_names[i]` (BASE_ROW: none)."""
        names = set(adapter_names)
        if names == {BASE_ROW}:  # the served model itself: the same weights, and no LoRA layer to hook
            return self.base_model(**kwargs)
        with self._lock:
            unknown = names - {BASE_ROW} - self._names
            if unknown:
                raise KeyError(f"adapters not loaded: {', '.join(sorted(unknown))}")
            if len(names) == 1:
                # Every row on one version (a pair, an evaluation batch): PEFT's plain forward on that
                # adapter. The mixed-batch path registers a hook on every LoRA layer and gathers each
                # version's rows in every one, per call: a pair decoded 0.54x as fast that way (bench).
                (name,) = names
                if self._active != name:
                    self._peft.set_adapter(name)
                    self._peft.requires_grad_(False)  # set_adapter marks the adapter trainable
                    self._active = name
                return self._peft(**kwargs)
            return self._peft(adapter_names=list(adapter_names), **kwargs)

    def version(self, name: str) -> HostedVersion:
        if name not in self.adapters:
            raise KeyError(f"adapter {name} is not loaded")
        return HostedVersion(self, name)


class HostedVersion:
    """One version on a `PeftHost`, called like the causal LM it is: every row of a call is that version's.
    What `sample_pair`, the evaluation and the metrics decode a hosted version with."""

    def __init__(self, host: PeftHost, name: str):
        self.host = host
        self.adapter_name = name
        base = host.base_model
        self.config = base.config
        self.generation_config = getattr(base, "generation_config", None)

    def parameters(self):
        return self.host.base_model.parameters()

    def __call__(self, input_ids: torch.Tensor | None = None, **kwargs):
        rows = input_ids.shape[0] if input_ids is not None else kwargs["inputs_embeds"].shape[0]
        return self.host.forward([self.adapter_name] * rows, input_ids=input_ids, **kwargs)

    def __repr__(self) -> str:
        return f"HostedVersion({self.adapter_name!r})"
