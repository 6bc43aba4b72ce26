"""The unit every preference trainer consumes: one tokenised (prompt, chosen, rejected) triple."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PreferencePair:
    prompt_ids: tuple[int, ...]  # the conversation up to the user turn, chat template applied
    chosen_ids: tuple[int, ...]  # the preferred reply's tokens, end-of-turn included
    rejected_ids: tuple[int, ...]
    # Provenance: where the pair came from, so a round can say what it trained on.
    source: str = "choice"  # 'choice', 'edit' or 'ratings'
    conversation_id: int | None = None
    turn_id: int | None = None
    chosen_reply_id: int | None = None  # None for an edit (the person's own text)
    rejected_reply_id: int | None = None
    policy_version: str | None = None  # the version that sampled the replies
    feedback_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not self.prompt_ids or not self.chosen_ids or not self.rejected_ids:
            raise ValueError("a preference pair needs a prompt and two non-empty replies")

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))
