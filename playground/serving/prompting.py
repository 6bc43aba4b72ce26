"""Turning a conversation into prompt tokens with the model's chat template, within a token budget."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from playground.serving.limits import MAX_MESSAGE_CHARS

# Room kept for the reply: the prompt may use the window minus max_new_tokens.
MIN_PROMPT_TOKENS = 16


@dataclass
class Prompt:
    ids: list[int]
    messages: list[dict[str, str]]  # exactly what was rendered: system (if any), history, the new user turn
    notes: list[str]


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of messages rendered with the chat template, ready for the assistant's reply.

    What people and the model wrote stays text: a message that contains a marker such as `<|im_start|>`
    is tokenised as the characters '<', '|', 'im', ..., never as the special token, so nobody can forge
    a system or assistant turn (issue 15). Only the template's own markers are special tokens.
    `add_generation_prompt=False` renders a finished conversation (the trainer's prompt + reply).
    """
    if not _holds_token_text(tokenizer, messages):
        # Today's exact path for every message without token text: stored token ids, seeds and the
        # trainer's prefix check stay as they were. (The sanitised path below gives the same ids for such
        # messages too; taking this path makes that a guarantee rather than a property of the library.)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if "sanitize_control_tokens" not in inspect.signature(tokenizer.apply_chat_template).parameters:
        # An older transformers would hand the flag to the template as a variable and sanitise nothing:
        # refuse rather than feed forged turns to the model.
        raise RuntimeError("this transformers cannot keep special-token text in messages as text; "
                           "install the version in requirements.txt")
    # transformers wraps each token text found in the messages in private-use markers, renders the
    # template, then tokenises the marked spans as plain text and the rest (the template) normally. The
    # markers sit around the token text itself, so templates that strip or trim a message keep them,
    # and the text is split only where a message holds token text.
    # (Not `split_special_tokens=True` per piece: that flips a flag on the tokenizer that every Gradio
    # thread shares, so a concurrent call could tokenise a message with special tokens parsed.)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         sanitize_control_tokens=True, return_dict=False)


def _holds_token_text(tokenizer, messages: list[dict[str, str]]) -> bool:
    """Whether any message holds the text of an added token (every special token is one)."""
    tokens = set(tokenizer.added_tokens_encoder) | set(tokenizer.all_special_tokens)
    tokens.discard("")
    return any(token in value for message in messages for value in message.values() if isinstance(value, str)
               for token in tokens)


def build_prompt(
    tokenizer,
    system_prompt: str,
    history: list[dict[str, str]],
    user_message: str,
    max_prompt_tokens: int,
) -> Prompt:
    """Render system + history + user message, dropping the oldest turns until it fits the budget."""
    notes = []
    if len(user_message) > MAX_MESSAGE_CHARS:
        notes.append(
            f"Your message has {len(user_message):,} characters; the model read the first "
            f"{MAX_MESSAGE_CHARS:,} (it is stored in full)."
        )
        user_message = user_message[:MAX_MESSAGE_CHARS]
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    budget = max(MIN_PROMPT_TOKENS, max_prompt_tokens)
    history = list(history)
    dropped = 0
    shortened_to = None
    while True:
        messages = system + history + [{"role": "user", "content": user_message}]
        ids = render(tokenizer, messages)
        if len(ids) <= budget:
            break
        if history:
            # Drop the oldest exchange (user + assistant) so roles keep alternating.
            history = history[2:]
            dropped += 1
            continue
        # Even the message alone is too long: keep its beginning, shortened until it fits.
        keep = int(len(user_message) * budget / len(ids) * 0.9)
        if keep <= 0 or keep >= len(user_message):
            keep = len(user_message) // 2
        if not user_message:
            raise ValueError("the system prompt alone is longer than the model's context window")
        user_message = shortened_to = user_message[:keep]
    if dropped:
        notes.append(f"The {dropped} oldest exchange(s) were left out to fit the model's context window.")
    if shortened_to is not None:
        notes.append(
            f"The message was shortened to {len(shortened_to):,} characters to fit the model's context window."
        )
    return Prompt(ids=ids, messages=messages, notes=notes)
