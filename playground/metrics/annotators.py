"""Per-annotator health: side bias, tie habits, and agreement with the other voters.

A vote is {"user", "simulated": bool, "item": hashable, "choice": "a" | "b" | "tie" | "both_bad",
optional "chosen_text_key"}. The same item means the same two reply texts were judged. Choices
compare exactly as given: when one item was shown with its sides swapped to different users, the
caller must normalise the choices (e.g. to the text chosen) before calling. chosen_text_key is
accepted and not read.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable

# Items need this many votes (everyone's) before a majority of the others means anything.
MIN_VOTES_FOR_MAJORITY = 3


def _share(count: int, total: int) -> float | None:
    return count / total if total else None


def _majority(choices: Counter) -> str | None:
    """The most common choice, or None when two choices tie for most common (or there are none)."""
    top = choices.most_common(2)
    if not top or (len(top) == 2 and top[0][1] == top[1][1]):
        return None
    return top[0][0]


def _agreement(user: str, by_item: dict[Hashable, dict[str, Counter]],
               own: list[dict]) -> tuple[int, int, int, int]:
    """(agreeing pairs, pairs, votes matching the others' majority, votes with a majority) for user."""
    agree = pairs = match = judged = 0
    for item in {v["item"] for v in own}:
        voters = by_item[item]
        others = Counter()
        for other, counts in voters.items():
            if other != user:
                others.update(counts)
        mine = voters[user]
        n_others = sum(others.values())
        pairs += sum(mine.values()) * n_others
        agree += sum(count * others[choice] for choice, count in mine.items())
        if sum(mine.values()) + n_others >= MIN_VOTES_FOR_MAJORITY:
            majority = _majority(others)
            if majority is not None:
                judged += sum(mine.values())
                match += mine[majority]
    return agree, pairs, match, judged


def annotator_health(votes: list[dict]) -> list[dict]:
    """One row per user, most votes first (then by user name):

    {"user", "simulated" (any of their votes was), "votes", "left_share" (a among a/b choices),
    "tie_share", "both_bad_share", "agreement" (share of (this user's vote, another user's vote) pairs
    on the same item that agree), "n_agreement", "majority_agreement" (share of this user's votes on
    items with >= 3 votes matching the majority of the other users' votes there; items where that
    majority is tied are left out), "n_majority"}. Shares with nothing to count are None.
    """
    by_user: dict[str, list[dict]] = defaultdict(list)
    by_item: dict[Hashable, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for v in votes:
        by_user[v["user"]].append(v)
        by_item[v["item"]][v["user"]][v["choice"]] += 1
    rows = []
    for user, own in by_user.items():
        choices = Counter(v["choice"] for v in own)
        n = len(own)
        agree, pairs, match, judged = _agreement(user, by_item, own)
        rows.append({
            "user": user,
            "simulated": any(bool(v.get("simulated")) for v in own),
            "votes": n,
            "left_share": _share(choices["a"], choices["a"] + choices["b"]),
            "tie_share": choices["tie"] / n,
            "both_bad_share": choices["both_bad"] / n,
            "agreement": _share(agree, pairs),
            "n_agreement": pairs,
            "majority_agreement": _share(match, judged),
            "n_majority": judged,
        })
    rows.sort(key=lambda r: (-r["votes"], str(r["user"])))
    return rows
