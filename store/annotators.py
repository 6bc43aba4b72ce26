"""Queries of the per-annotator view: how each person votes, whether others agree, and who is left out.

A mixin of `Store` (its connection, lock and transactions), like `InsightQueries`.

Who an annotator is: the user a judgment is recorded under (`feedback.user`) for how they vote, and the
user of the conversation a pair comes from (`training_pairs.user`, the index's indexed column) for which
pairs training leaves out. The chat records a session's judgments under the session's own user, so the
two are the same person.

Agreement needs the same thing judged by more than one person. In this app a pair's two replies are
fresh samples with random seeds, so two people almost never see the same two texts; what they do share
is the same prompt. Two kinds of "repeated pair" are compared here (`item_key`):

- an **arena pair** (two versions, shown blind): the same context and the same two versions, whatever the
  sampled texts; the judgment compared is the *version* chosen (or tie, both-bad). Several people asking
  the same first question in arena turns judge the same comparison of versions.
- any other pair whose context and two reply texts (in either order) equal another's: the *text*
  chosen is compared, so one pair shown with its sides swapped compares as the same judgment.

Two on-policy pairs on the same prompt with different texts are not compared: their replies are
exchangeable samples of one version, so which of them someone picked says nothing another person's pick
can agree with.

Exclusion from training is an append-only log (`annotator_exclusions`, m008): each exclude or include is
a new row with who did it and why; the newest row of a user is in force, so it is recorded and reversible.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

# Items need this many votes (everyone's) before a majority of the others means anything.
MIN_VOTES_FOR_MAJORITY = 3
MAX_REASON_CHARS = 500
MAX_ANNOTATOR_CHARS = 100


class AnnotatorError(ValueError):
    """An exclusion that cannot be recorded as asked (unknown annotator, already excluded...). Nothing written."""


def item_key(vote: dict) -> tuple[tuple, str]:
    """(what was judged, the judgment in that item's terms) for one vote of `Store.votes`' rows."""
    choice = vote["choice"]
    if vote["a_version"] != vote["b_version"]:
        versions = tuple(sorted([str(vote["a_version"]), str(vote["b_version"])]))
        if choice in ("a", "b"):
            choice = "version:" + str(vote[f"{choice}_version"])
        return ("arena", vote["context_json"], versions), choice
    texts = tuple(sorted([vote["a_text"], vote["b_text"]]))
    if choice in ("a", "b"):
        choice = "first" if vote[f"{choice}_text"] == texts[0] else "second"
    return ("texts", vote["context_json"], texts), choice


def _majority(choices: Counter) -> str | None:
    """The most common choice, or None when two choices tie for most common (or there are none)."""
    top = choices.most_common(2)
    if not top or (len(top) == 2 and top[0][1] == top[1][1]):
        return None
    return top[0][0]


def annotator_counts(votes: list[dict]) -> list[dict]:
    """Raw counts per user from `Store.votes` rows, most votes first (then by name): {user, simulated (any
    of their votes was), votes, a, b, tie, both_bad (as shown: a is the left reply), agree, n_agreement
    (pairs of this user's vote and another user's vote on the same item, and how many of them agree),
    majority_match, n_majority (this user's votes on items with at least MIN_VOTES_FOR_MAJORITY votes
    where the other users' votes have one most common judgment, and how many match it)}."""
    by_user: dict[str, list[tuple[tuple, str]]] = defaultdict(list)
    shown: dict[str, Counter] = defaultdict(Counter)
    simulated: dict[str, bool] = defaultdict(bool)
    by_item: dict[tuple, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for v in votes:
        user = v["user"]
        key, choice = item_key(v)
        by_user[user].append((key, choice))
        shown[user][v["choice"]] += 1
        simulated[user] = simulated[user] or bool(v.get("simulated"))
        by_item[key][user][choice] += 1
    rows = []
    for user, own in by_user.items():
        agree = pairs = match = judged = 0
        for key in {k for k, _ in own}:
            voters = by_item[key]
            others = Counter()
            for other, counts in voters.items():
                if other != user:
                    others.update(counts)
            mine = voters[user]
            n_mine, n_others = sum(mine.values()), sum(others.values())
            pairs += n_mine * n_others
            agree += sum(count * others[choice] for choice, count in mine.items())
            majority = _majority(others) if n_mine + n_others >= MIN_VOTES_FOR_MAJORITY else None
            if majority is not None:
                judged += n_mine
                match += mine[majority]
        counts = shown[user]
        rows.append({"user": user, "simulated": simulated[user], "votes": len(own), "a": counts["a"],
                     "b": counts["b"], "tie": counts["tie"], "both_bad": counts["both_bad"], "agree": agree,
                     "n_agreement": pairs, "majority_match": match, "n_majority": judged})
    rows.sort(key=lambda r: (-r["votes"], str(r["user"])))
    return rows


class AnnotatorQueries:
    # -- how each annotator votes ---------------------------------------------------------------------

    def annotator_counts(self, model_id: str, votes: list[dict] | None = None) -> list[dict[str, Any]]:
        """Per user, the raw counts of `annotator_counts` over this model's current choices (`votes`:
        `Store.votes(model_id)` when the caller already read them), plus `training_pairs` (their pairs
        in the index, held out or not) and `excluded` (the exclusion in force, or None). Users with
        pairs but no choice (thumbs or better replies only) and excluded users with nothing are listed too."""
        rows = {r["user"]: r for r in annotator_counts(self.votes(model_id) if votes is None else votes)}
        pairs = {r["user"]: int(r["n"]) for r in self._rows(
            "select p.user, count(*) as n from training_pairs p join conversations c on c.id = p.conversation_id"
            " where c.model_id = ? and p.user is not null group by p.user", [model_id])}
        excluded = {r["user"]: r for r in self.excluded_annotators()}
        for user in (set(pairs) | set(excluded)) - set(rows):
            rows[user] = {"user": user, "simulated": False, "votes": 0, "a": 0, "b": 0, "tie": 0, "both_bad": 0,
                          "agree": 0, "n_agreement": 0, "majority_match": 0, "n_majority": 0}
        for user, row in rows.items():
            row["training_pairs"] = pairs.get(user, 0)
            row["excluded"] = excluded.get(user)
        return sorted(rows.values(), key=lambda r: (-r["votes"], str(r["user"])))

    def annotator_held_out(self, evaluation_id: int) -> dict[str, dict[str, float]]:
        """Per user, how the evaluated version's implicit reward scored that user's held-out pairs:
        {user: {right (a zero margin counts half), n}}. Pairs re-indexed since the evaluation (a judgment
        changed) no longer match and are left out."""
        rows = self._rows(
            "select p.user, sum(case when e.margin > 0 then 1.0 when e.margin = 0 then 0.5 else 0.0 end) as right,"
            " count(*) as n from eval_pairs e join training_pairs p on p.id = e.training_pair_id"
            " where e.evaluation_id = ? and p.user is not null group by p.user", [evaluation_id])
        return {r["user"]: {"right": float(r["right"]), "n": int(r["n"])} for r in rows}

    # -- exclusion from training ----------------------------------------------------------------------

    def exclude_annotator(self, user: str, by_user: str, reason: str = "") -> dict[str, Any]:
        """Leave `user`'s pairs out of training from the next round on; returns the recorded row.
        AnnotatorError for a name with no judgment, conversation or exclusion on record, or one already
        excluded."""
        return self._set_exclusion(user, by_user, reason, excluded=True)

    def include_annotator(self, user: str, by_user: str, reason: str = "") -> dict[str, Any]:
        """Undo an exclusion (a new row: the log keeps both). AnnotatorError when `user` is not excluded."""
        return self._set_exclusion(user, by_user, reason, excluded=False)

    def _set_exclusion(self, user: str, by_user: str, reason: str, excluded: bool) -> dict[str, Any]:
        user = (user or "").strip()
        reason = (reason or "").strip()
        if not user or len(user) > MAX_ANNOTATOR_CHARS:
            raise AnnotatorError(f"name an annotator (1 to {MAX_ANNOTATOR_CHARS} characters)")
        if len(reason) > MAX_REASON_CHARS:
            raise AnnotatorError(f"the reason is {len(reason)} characters; at most {MAX_REASON_CHARS}")
        with self._write("the exclusion") as db:
            current = list(db.query("select excluded from annotator_exclusions where user = ? order by id desc"
                                    " limit 1", [user]))
            now_excluded = bool(current and current[0]["excluded"])
            if excluded and now_excluded:
                raise AnnotatorError(f"{user} is already excluded from training")
            if not excluded and not now_excluded:
                raise AnnotatorError(f"{user} is not excluded from training")
            if excluded and not current and not list(db.query(
                    "select 1 from feedback where user = ? union all select 1 from conversations where user = ?"
                    " limit 1", [user, user])):
                raise AnnotatorError(f"no annotator named {user!r} has judged anything")
            row = {"user": user, "excluded": int(excluded), "by_user": by_user, "reason": reason,
                   "created_at": self._now()}
            row["id"] = int(db["annotator_exclusions"].insert(row).last_pk)
            return row

    def excluded_annotators(self) -> list[dict[str, Any]]:
        """The exclusions in force (each user's newest row says excluded), by name: {user, by_user, reason,
        created_at}."""
        return self._rows(
            "select x.user, x.by_user, x.reason, x.created_at from annotator_exclusions x"
            " where x.id = (select max(id) from annotator_exclusions y where y.user = x.user) and x.excluded = 1"
            " order by x.user")

    def excluded_users(self) -> list[str]:
        """The names of the annotators excluded now (what a round leaves out)."""
        return [r["user"] for r in self.excluded_annotators()]

    def exclusion_log(self, user: str | None = None) -> list[dict[str, Any]]:
        """Every exclude and include, oldest first (one user's when given)."""
        if user is None:
            return self._rows("select * from annotator_exclusions order by id")
        return self._rows("select * from annotator_exclusions where user = ? order by id", [user])
