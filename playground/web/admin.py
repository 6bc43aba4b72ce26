"""The training side of the UI: the status line's text, the admin panel, and the round curves.

`build_admin(loop, service)` is called inside `build_ui`'s Blocks; callbacks stay thin and call
`TrainingLoop` (never the store). Public endpoints: `/train_now`, `/pause`, `/resume`, `/rollback`,
`/training_status`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from playground.sim.gold import GOLD_NAMES, GoldError
from playground.loop import TrainingLoop
from playground.sim.prompt_file import PromptFileError
from playground.sim.autopilot import Autopilot
from trainers.dpo import DPOConfig

STATUS_REFRESH_S = 2.0
# Two plots, each of metrics on one scale: the loss side, and the log-probs (a falling chosen log-prob
# while the margin grows is likelihood displacement).
CURVES = ("loss", "rewards/margins", "rewards/accuracies", "grad_norm")
LOGP_CURVES = ("logps/chosen", "logps/rejected")
RUN_COLUMNS = ["id", "status", "version", "parent_version", "n_pairs", "held_out_acc", "trigger", "started_at",
               "reason"]


@dataclass
class TabView:
    """What one browser tab shows of the loop (per-session UI state, kept out of the chat session)."""

    seen_version: str | None = None  # the live version this tab last saw, for the 'new version' toast
    curves_run: int | None = None  # the round whose curves this tab shows (None: the latest)
    admin_open: bool = False  # the admin panel's tables and curves are sent only while it is open


def status_line(status: dict) -> str:
    parts = [f"Live policy **{status['live']}**"]
    running = status["running"]
    if running:
        total = running["total_steps"] or "?"
        loss = f" · loss {running['loss']:.4f}" if running["loss"] is not None else ""
        parts.append(f"round {running['run_id']} training: step {running['step']}/{total}{loss}")
    parts.append(f"new pairs {status['new_pairs']}/{status['min_new_pairs']}")
    if not status["enabled"]:
        parts.append("schedule off (--no-train)")
    elif status["paused"]:
        parts.append("schedule paused")
    elif status["next_check"]:
        parts.append(f"next check {status['next_check'][11:19]} UTC")
    return " · ".join(parts)


def progress_fraction(status: dict) -> float:
    running = status["running"]
    if not running or not running["total_steps"]:
        return 0.0
    return running["step"] / running["total_steps"]


def held_out_accuracy(run: dict) -> str | None:
    """'0.45 -> 0.70': the round's held-out implicit-reward accuracy before and after it trained."""
    try:
        metrics = json.loads(run.get("metrics_json") or "{}")
        before, after = metrics["held_out_before"], metrics["held_out_after"]
    except (ValueError, KeyError, TypeError):
        return None
    if not after.get("n"):
        return "no held-out pairs yet"
    return f"{before['accuracy']:.2f} -> {after['accuracy']:.2f} (n={after['n']})"


def runs_frame(loop: TrainingLoop) -> pd.DataFrame:
    rows = loop.runs()
    return pd.DataFrame([{**{c: r.get(c) for c in RUN_COLUMNS}, "held_out_acc": held_out_accuracy(r)} for r in rows],
                        columns=RUN_COLUMNS)


def curves_frame(loop: TrainingLoop, run_id, names: tuple[str, ...] = CURVES) -> pd.DataFrame | None:
    # None, not an empty frame, when there is nothing to plot: the plot takes its color domain (the metric
    # names) from the first value it draws and later values only replace its rows, so an empty
    # first frame leaves every line without a color (no lines, no legend) for good.
    _, rows = loop.curves(None if run_id in (None, "") else int(run_id))
    rows = [r for r in rows if r["name"] in names]
    if not rows:
        return None
    return _curve_types(pd.DataFrame([{"step": r["step"], "value": r["value"], "metric": r["name"]} for r in rows],
                                     columns=["step", "value", "metric"]))


def _curve_types(frame: pd.DataFrame) -> pd.DataFrame:
    # Numeric columns must be numeric dtypes: the plot treats an object column (an empty frame, or a
    # value column with a None in it) as categories, one tick per distinct number.
    return frame.astype({"step": "int64", "value": "float64", "metric": "object"})


def version_choices(loop: TrainingLoop) -> list[str]:
    return loop.versions()


def build_admin(loop: TrainingLoop, service=None):
    # A tab of the page (build_ui opens the tabs): its tables load when it is chosen, not on every page load.
    with gr.Tab("Training loop (admin)", id="admin", elem_id="admin") as panel:
        with gr.Row():
            train_now = gr.Button("Train now", variant="primary", elem_id="train-now")
            pause = gr.Button("Pause schedule", elem_id="pause")
            resume = gr.Button("Resume schedule", elem_id="resume")
        admin_note = gr.Markdown(elem_id="admin-note")
        with gr.Row():
            beta = gr.Slider(0.01, 1.0, value=0.1, step=0.01, label="beta (next round)")
            defaults = DPOConfig()
            learning_rate = gr.Number(value=defaults.learning_rate, label="learning rate")
            epochs = gr.Number(value=defaults.epochs, label="epochs", precision=0)
            loss_type = gr.Radio(["sigmoid", "ipo"], value="sigmoid", label="loss")
            ref = gr.Radio(["base", "previous"], value="base", label="reference policy")
        arena = gr.Checkbox(value=loop.settings.include_arena, elem_id="train-on-arena",
                            label="Train on blind arena votes too (by default they only rate the versions)")
        apply = gr.Button("Use these settings for the next round", elem_id="apply-settings")
        with gr.Row():
            version = gr.Dropdown(choices=version_choices(loop), label="Version", elem_id="version-pick",
                                  allow_custom_value=True)
            rollback = gr.Button("Make this version live", elem_id="rollback")
        autopilot = Autopilot(service, loop) if service is not None else None
        if autopilot is not None:
            with gr.Group():
                with gr.Row():
                    gold = gr.Dropdown(choices=list(GOLD_NAMES), value="concise", allow_custom_value=True,
                                       label="Autopilot preference (or 'package.module:function')",
                                       elem_id="autopilot-gold")
                    sim_users = gr.Number(value=3, precision=0, label="simulated users")
                    sim_turns = gr.Number(value=200, precision=0, label="votes")
                    sim_flip = gr.Slider(0.0, 0.5, value=0.25, step=0.05, label="flip rate (label noise)")
                with gr.Row():
                    start_autopilot = gr.Button("Start autopilot", elem_id="autopilot-start")
                    stop_autopilot = gr.Button("Stop autopilot", elem_id="autopilot-stop")
                autopilot_status = gr.Markdown(value=autopilot.status, elem_id="autopilot-status", every=2.0)
        # Filled when the panel opens (and refreshed while it is open), not on every page load.
        runs = gr.Dataframe(headers=RUN_COLUMNS, label="Rounds", interactive=False, elem_id="runs")
        run_pick = gr.Textbox(label="Round id for the curves (blank: the latest)", elem_id="run-pick")
        with gr.Row():
            curves = gr.LinePlot(x="step", y="value", color="metric",
                                 label="Loss, margin, accuracy, grad norm", elem_id="curves")
            logp_curves = gr.LinePlot(x="step", y="value",
                                      color="metric", label="Log-probs of chosen and rejected replies",
                                      elem_id="logp-curves")

    def note(message: str) -> str:
        return f"**{message}**"

    train_now.click(lambda: note(loop.train_now()), None, admin_note, api_name="train_now")
    pause.click(lambda: (loop.set_paused(True), note("Schedule paused."))[1], None, admin_note, api_name="pause")
    resume.click(lambda: (loop.set_paused(False), note("Schedule running."))[1], None, admin_note,
                 api_name="resume")

    def apply_settings(beta_value, lr, n_epochs, loss_value, ref_value):
        config = {"beta": float(beta_value), "loss": loss_value, "ref": ref_value}
        if lr not in (None, ""):
            config["learning_rate"] = float(lr)
        if n_epochs not in (None, ""):
            config["epochs"] = int(n_epochs)
        try:
            config = loop.set_next_config(config)
        except ValueError as exc:
            raise gr.Error(f"Not applied: {exc}") from exc
        return note(f"The next round uses {config}.")

    apply.click(apply_settings, [beta, learning_rate, epochs, loss_type, ref], admin_note, api_visibility="private")

    def set_arena(include: bool):
        loop.set_include_arena(bool(include))
        return note("Rounds train on arena votes too." if include else "Arena votes only rate versions now.")

    arena.input(set_arena, [arena], admin_note, api_visibility="private")

    def do_rollback(name: str):
        if not name:
            raise gr.Error("Pick a version first.")
        if name not in version_choices(loop):
            raise gr.Error(f"There is no version {name!r}.")
        try:
            seconds = loop.rollback(name)
        except Exception as exc:  # an adapter that fails verification: say why, keep serving
            raise gr.Error(f"{name} was not made live: {exc}") from exc
        return note(f"{name} is live (swap took {seconds * 1000:.1f} ms).")

    rollback.click(do_rollback, [version], admin_note, api_name="rollback")

    if autopilot is not None:
        def begin(gold_spec, users, turns, flip):
            try:
                return note(autopilot.start(gold_spec, users, turns, flip))
            except (GoldError, PromptFileError, ValueError, TypeError) as exc:
                raise gr.Error(f"Autopilot not started: {exc}") from exc

        start_autopilot.click(begin, [gold, sim_users, sim_turns, sim_flip], admin_note, api_visibility="private")
        stop_autopilot.click(lambda: note(autopilot.stop()), None, admin_note, api_visibility="private")

    def training_status() -> dict:
        """The loop's state: live version, round in progress, next check, new pairs, recent events."""
        return loop.status()

    with panel:  # inside the tab: the page's tabs hold only tabs
        gr.api(training_status, api_name="training_status")
    return {"panel": panel, "runs": runs, "curves": curves, "logp_curves": logp_curves, "version": version,
            "run_pick": run_pick}
