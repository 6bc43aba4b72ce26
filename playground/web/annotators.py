"""The admin's per-annotator view: the annotator table, "Exclude from training" / "Include again", and a
trial round without one annotator.

`build_annotators(loop)` is called inside the admin tab (`build_admin`); the callbacks are a few lines
that call `TrainingLoop` (exclusions, trials) and `playground.dashboard.annotator_rows` (the table the
Dashboard tab shows too). Public endpoints: `/annotators` (the table as JSON), `/exclude_annotator`,
`/include_annotator` and `/train_without`: admin actions, each of which first calls `require_admin(request,
action)` (the login's check, `playground.web.auth.require_admin`: a gr.Error for anyone but an admin;
without accounts the app is single-user and there is nothing to check). The callbacks take the request
themselves because the exclusion records who made it.
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from playground.dashboard import annotator_rows
from playground.loop import TrainingLoop
from playground.web.tables import ANNOTATOR_COLUMNS, annotator_table
from store import AnnotatorError, StoreError

# Recorded as who excluded someone when the app runs without accounts (single user on localhost).
LOCAL_ADMIN = "local admin"


def acting_user(request: gr.Request | None) -> str:
    """Who pressed the button: the signed-in name with --auth, else LOCAL_ADMIN."""
    return getattr(request, "username", None) or LOCAL_ADMIN


def build_annotators(loop: TrainingLoop, panel: gr.Tab | None = None,
                     require_admin: Callable[[gr.Request | None, str], None] | None = None) -> dict:
    """The accordion, its callbacks and the endpoints (the table loads when `panel`, the admin tab, is
    chosen, and on Refresh); every admin action calls `require_admin(request, action)` first."""
    model_id = loop.policy.model_id

    def check(request: gr.Request | None, action: str) -> str:
        if require_admin is not None:
            require_admin(request, action)
        return acting_user(request)

    def rows() -> list[dict]:
        return annotator_rows(loop.store, model_id)

    with gr.Accordion("Annotators: quality and exclusion from training", open=True, elem_id="annotators-admin"):
        gr.Markdown("Excluding an annotator leaves their pairs out of the next rounds (train, replay and held-out "
                    "alike) and out of the new-pairs count; it is recorded with your name and reason, and "
                    "**Include again** reverses it. **Train without them (trial)** trains two rounds from the base "
                    "model on the same newest pairs, with and without theirs, and reports both held-out accuracies; "
                    "it publishes nothing.")
        table = gr.Dataframe(headers=ANNOTATOR_COLUMNS, interactive=False, elem_id="annotator-table", wrap=True)
        with gr.Row():
            who = gr.Dropdown(choices=[], label="Annotator", allow_custom_value=True, elem_id="annotator-pick")
            reason = gr.Textbox(label="Reason (recorded)", elem_id="annotator-reason", max_length=500)
        with gr.Row():
            exclude = gr.Button("Exclude from training", variant="stop", elem_id="annotator-exclude")
            include = gr.Button("Include again", elem_id="annotator-include")
            trial = gr.Button("Train without them (trial)", elem_id="annotator-trial")
            refresh = gr.Button("Refresh", elem_id="annotator-refresh")
        note = gr.Markdown(elem_id="annotator-note")

    def annotators() -> list[dict]:
        """Per annotator: votes, left-side share with its 95% interval, tie and both-bad shares, agreement
        with others and with the majority on repeated pairs, training pairs, whether excluded, the live
        version's accuracy on their held-out votes, and their newest trial round."""
        return rows()

    def exclude_annotator(user: str, reason: str = "", request: gr.Request = None) -> dict:
        """Leave `user`'s pairs out of training from the next round on (recorded, reversible)."""
        by_user = check(request, "exclude an annotator")
        try:
            return loop.exclude_annotator(user, by_user, reason)
        except (AnnotatorError, StoreError) as exc:
            raise gr.Error(f"Not excluded: {exc}") from exc

    def include_annotator(user: str, reason: str = "", request: gr.Request = None) -> dict:
        """Train on `user`'s pairs again from the next round on (the exclusion stays in the log)."""
        by_user = check(request, "include an annotator")
        try:
            return loop.include_annotator(user, by_user, reason)
        except (AnnotatorError, StoreError) as exc:
            raise gr.Error(f"Not included: {exc}") from exc

    def train_without(user: str, request: gr.Request = None) -> str:
        """Start a trial: two rounds with and without `user`'s pairs, publishing nothing."""
        check(request, "train without an annotator")
        user = (user or "").strip()
        if user not in {r["user"] for r in rows()}:
            raise gr.Error(f"There is no annotator {user!r}.")
        return loop.start_trial(user)

    def view(message: str = ""):
        current = rows()
        return (annotator_table({"annotators": current}), gr.update(choices=[r["user"] for r in current]),
                f"**{message}**" if message else "")

    def on_exclude(user, why, request: gr.Request):
        row = exclude_annotator(user, why, request)
        return view(f"{row['user']} is excluded from training from the next round on.")

    def on_include(user, why, request: gr.Request):
        row = include_annotator(user, why, request)
        return view(f"{row['user']} is in training again from the next round on.")

    def on_trial(user, request: gr.Request):
        return view(train_without(user, request))

    outputs = [table, who, note]
    exclude.click(on_exclude, [who, reason], outputs, api_visibility="private")
    include.click(on_include, [who, reason], outputs, api_visibility="private")
    trial.click(on_trial, [who], outputs, api_visibility="private")
    refresh.click(view, None, outputs, api_visibility="private")
    if panel is not None:
        panel.select(view, None, outputs, api_visibility="private")
    gr.api(annotators, api_name="annotators")
    gr.api(exclude_annotator, api_name="exclude_annotator")
    gr.api(include_annotator, api_name="include_annotator")
    gr.api(train_without, api_name="train_without")
    return {"table": table, "who": who, "note": note, "refresh": view, "outputs": outputs}
