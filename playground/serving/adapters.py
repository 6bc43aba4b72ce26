"""Adapter folders on disk: published atomically, verified before anything serves them.

A version is `adapters/vN/`: a standard PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`) plus `manifest.json` (parent version, algorithm, config, data counts,
metrics, and the sha256 of every file). It is written into a hidden temporary folder and renamed into
place only when complete and verified, so a killed trainer can leave only a `.tmp-*` folder, which is
never served and is cleaned up by the next round.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

MANIFEST = "manifest.json"
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
TMP_PREFIX = ".tmp-"

log = logging.getLogger(__name__)


class AdapterError(RuntimeError):
    """An adapter folder that must not be served; the message says what is wrong with it."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def publish(adapters_dir: Path, name: str, write: Callable[[Path], None], manifest: dict,
            verify: Callable[[Path], None] | None = None, required: Sequence[str] = REQUIRED_FILES) -> Path:
    """Write an adapter with `write(tmp)`, add the manifest, verify, then rename to adapters_dir/name.

    required: the files the folder must hold (a reward model adds its score head and statistics)."""
    adapters_dir = Path(adapters_dir)
    adapters_dir.mkdir(parents=True, exist_ok=True)
    final = adapters_dir / name
    if final.exists():
        raise AdapterError(f"{final} already exists; versions are never overwritten")
    tmp = adapters_dir / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        manifest = dict(manifest, name=name, files={p.name: sha256(p) for p in sorted(tmp.iterdir())})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        check_files(tmp, required=required)
        if verify is not None:
            verify(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def clean_temporary(adapters_dir: Path) -> list[str]:
    """Remove half-written folders that a killed trainer left behind."""
    removed = []
    for path in Path(adapters_dir).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def check_files(folder: Path, base_model_id: str | None = None, required: Sequence[str] = REQUIRED_FILES) -> dict:
    """The manifest parses, names this base model, lists every `required` file, and every file matches its
    hash. Returns it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not a folder")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise AdapterError(f"{folder} has no {MANIFEST}: not a published version") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{folder}/{MANIFEST} is corrupt: {exc}") from exc
    if base_model_id is not None and manifest.get("base_model_id") != base_model_id:
        raise AdapterError(
            f"{folder.name} was trained on {manifest.get('base_model_id')!r}, not on the served {base_model_id!r}"
        )
    for needed in required:
        if needed not in manifest.get("files", {}):
            raise AdapterError(f"{folder.name} lacks {needed}")
    for name, digest in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise AdapterError(f"{folder.name}/{name} is missing")
        if sha256(path) != digest:
            raise AdapterError(f"{folder.name}/{name} does not match its hash: truncated or corrupt")
    return manifest


def merged_model(base_model, folder: Path):
    """A copy of the base model with the adapter merged in: fast to decode, and independent of the base.

    Each version gets its own weights, so a generation that started on one version finishes on it
    whatever becomes live meanwhile, with no global 'active adapter' to switch.
    """
    from peft import PeftModel

    from playground.serving.fastlinear import use_skinny_linear

    try:
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(folder))
        model = peft_model.merge_and_unload()
    except Exception as exc:  # peft raises many kinds: size mismatch, bad config, unreadable tensors
        raise AdapterError(f"{Path(folder).name} does not load onto this base model: {exc}") from exc
    model.eval()
    if next(model.parameters()).device.type == "cpu":
        use_skinny_linear(model)
    probe_finite(model)
    return model


@torch.inference_mode()
def probe_finite(model) -> None:
    """Raise AdapterError unless `model` (a causal LM, or a hosted version) gives finite logits on a probe."""
    device = next(model.parameters()).device
    ids = torch.arange(1, 9, device=device)[None, :] % model.config.vocab_size
    logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise AdapterError("the adapter produces non-finite logits")


def load_version(base_model, folder: Path, base_model_id: str):
    """Verify a published version and return (manifest, merged model); raises AdapterError."""
    manifest = check_files(folder, base_model_id)
    return manifest, merged_model(base_model, folder)


# -- a published version as something to decode --------------------------------------------------

# A new adapter's logits are checked finite on a prompt this long before anything decodes it.
PROBE_TOKENS = 8


def resident_snapshot(policy, version: str, folder: Path, manifest: dict):
    """A verified version as its adapter, resident in the base model's engine and applied per row: the
    version costs the size of its adapter, and no copy of the weights is made, not even to verify it (the
    adapter's logits are probed on the engine). None where the engine cannot serve it (no engine for this
    model, `policy.per_row_adapters` off, or an adapter config it does not apply): serve it merged then.
    Raises AdapterError for an adapter that does not fit this model or gives non-finite logits.

    The name in the engine carries the weights' hash: the engine outlives a database (tests, a store
    started afresh), where another 'v1' may be another adapter. A version already resident is reused."""
    from playground.serving.engine import AdapterUnsupported, read_adapter
    from playground.serving.generation import engine_for
    from playground.serving.policy import PolicySnapshot

    base = policy.base
    engine = engine_for(base.model) if policy.per_row_adapters else None
    if engine is None:
        return None
    name = f"{version}:{manifest['files']['adapter_model.safetensors'][:16]}"
    try:
        lora = read_adapter(folder)
        if not all(bool(torch.isfinite(t).all()) for t in lora[0].values()):
            raise AdapterError(f"{Path(folder).name} has non-finite weights")
        if name not in engine.adapters:
            engine.add_adapter(name, *lora)
            _probe_engine_finite(engine, name)
    except AdapterUnsupported as exc:
        log.info("%s is served merged: %s", version, exc)
        return None
    except AdapterError:
        raise
    except (ValueError, OSError, RuntimeError) as exc:
        raise AdapterError(f"{Path(folder).name} does not load onto this base model: {exc}") from exc
    return PolicySnapshot(version, base.model, base.tokenizer, policy.model_id, adapter=name, lora=lora)


def hosted_snapshot(policy, version: str, folder: Path, manifest: dict):
    """A verified version as an adapter on the policy's PEFT host (playground/serving/peft_host.py), for a
    base model the engine does not support: one copy of the base weights for every version, as on the
    engine. None where the host is not used (`policy.per_row_adapters` off, or the engine supports the
    model: then `resident_snapshot` serves it, or a merged copy with its engine, which decodes faster than
    PEFT). Raises AdapterError for an adapter that does not load or gives non-finite logits; nothing of
    it stays on the host, and the versions already there are untouched."""
    from playground.serving.generation import engine_for
    from playground.serving.peft_host import HostError
    from playground.serving.policy import PolicySnapshot

    base = policy.base
    if not policy.per_row_adapters or engine_for(base.model) is not None:
        return None
    host = policy.peft_host()
    name = f"{version}_{manifest['files']['adapter_model.safetensors'][:16]}"
    try:
        host.add(name, folder)
    except HostError as exc:
        raise AdapterError(str(exc)) from exc
    hosted = host.version(name)
    try:
        probe_finite(hosted)
    except AdapterError:
        host.remove(name)
        raise
    return PolicySnapshot(version, hosted, base.tokenizer, policy.model_id)


def version_snapshot(policy, version: str, folder: Path):
    """A published version, verified, as `TrainingLoop` serves it: resident in the base engine where it
    can be; for a model the engine does not support, an adapter on the PEFT host; else a merged copy of
    the weights (with its engine built). Raises AdapterError."""
    from playground.serving.generation import engine_for
    from playground.serving.policy import PolicySnapshot

    folder = Path(folder)
    manifest = check_files(folder, policy.model_id)
    snapshot = resident_snapshot(policy, version, folder, manifest)
    if snapshot is None:
        snapshot = hosted_snapshot(policy, version, folder, manifest)
    if snapshot is None:
        model = merged_model(policy.base.model, folder)
        engine_for(model)
        snapshot = PolicySnapshot(version, model, policy.base.tokenizer, policy.model_id)
    return snapshot


@torch.inference_mode()
def _probe_engine_finite(engine, name: str) -> None:
    probe = [1 + i % (engine.vocab_size - 1) for i in range(PROBE_TOKENS)]
    _, logits = engine.prefill(probe, 1, len(probe) + 1, adapter=name)
    if not bool(torch.isfinite(logits).all()):
        engine.remove_adapter(name)
        raise AdapterError(f"{name} produces non-finite logits")
