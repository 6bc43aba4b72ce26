"""Turning a conversation into prompt tokens with the model's chat template, within a token budget."""

from __future__ import annotations

from dataclasses import dataclass

from playground.serving.limits import MAX_MESSAGE_CHARS

# Room kept for the reply: the prompt may use the window minus max_new_tokens.
MIN_PROMPT_TOKENS = 16


@dataclass
class Prompt:
    ids: list[int]
    messages: list[dict[str, str]]  # exactly what was rendered: system (if any), history, the new user turn
    notes: list[str]


def render(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of messages rendered with the chat template, ready for the assistant's reply."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
