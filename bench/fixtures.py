"""What the tests and the benchmarks both need: a tiny random chat model built locally in a second
(nothing downloaded), random preference pairs, and a free loopback port.

It lives under bench/ because bench never imports tests/; tests import it from here."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The capital of Spain is Madrid.",
    "Hello! How can I help you today? I am a helpful assistant.",
    "Here is a short list:\n- apples\n- pears\n- plums",
    "<script>alert(1)</script> markup, emoji 🙂, right-to-left שלום, control \x00 \x07 characters.",
    "def add(a, b):\n    return a + b",
]


def build_tiny_model(folder: Path, seed: int = 0, vocab_size: int = 384) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 20, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def random_pairs(vocab: int, n: int, seed: int, prompt=(3, 12), reply=(1, 10)):
    """n preference pairs of random token ids (ids 0-2 are left to the special tokens); lengths drawn
    from the (low, high) ranges given."""
    from trainers.pairs import PreferencePair

    rng = random.Random(seed)

    def tokens(lo, hi):
        return tuple(rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi)))

    return [PreferencePair(tokens(*prompt), tokens(*reply), tokens(*reply)) for _ in range(n)]


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on right now."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(work: Callable[[int], None], n: int) -> float:
    """Run work(0) .. work(n - 1) on n threads released at the same moment; returns the seconds from the
    release to the end of the last (thread start-up is not counted)."""
    barrier = threading.Barrier(n + 1)

    def worker(i: int) -> None:
        barrier.wait()
        work(i)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - started
