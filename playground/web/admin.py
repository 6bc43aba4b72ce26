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

from playground.sim.annotator import DEFAULT_TRIGGER
from playground.sim.gold import GOLD_NAMES, GoldError
from playground.loop import TrainingLoop
from playground.sim.prompt_file import PromptFileError
from playground.sim.autopilot import Autopilot
from playground.web.annotators import build_annotators
from playground.web.auth import admin_only, require_admin
from trainers.dpo import DPOConfig
from trainers.ppo import PPOConfig

STATUS_REFRESH_S = 2.0
# The panel's ceiling on the weight of imitating typed replies: the term is a per-token NLL of a few nats
# against DPO's loss of under one, so past a few times that a round only imitates and stops ranking.
MAX_EDIT_SFT_WEIGHT = 4.0
# The round's curves, one plot per job, each drawn only for the rounds that log all of its metrics: a plot
# takes its colour domain (the metric names) from the first frame it draws and keeps it, so a plot whose
# names changed from round to round would draw the new ones without colour or legend until a reload.
# DPO: the loss side, and the log-probs (a falling chosen log-prob while the margin grows is likelihood
# displacement). A reward model (alone, or a PPO round's first phase): its fit. PPO: the score and the KL
# it trades, then whether the updates are healthy (entropy, clipping, old-new KL, critic, cut replies).
CURVE_PLOTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "curves": (("dpo",), ("loss", "rewards/margins", "rewards/accuracies", "grad_norm"),
               "DPO: loss, margin, accuracy, grad norm"),
    "logp_curves": (("dpo",), ("logps/chosen", "logps/rejected"), "DPO: log-probs of chosen and rejected replies"),
    "rm_curves": (("reward", "ppo"), ("rm/loss", "rm/accuracy", "rm/margin"), "Reward model: loss, accuracy, margin"),
    "ppo_curves": (("ppo",), ("score/mean", "kl", "loss"), "PPO: reward-model score, KL to v0, loss"),
    "ppo_health": (("ppo",), ("entropy", "clip_fraction", "approx_kl", "value_loss", "truncated_share"),
                   "PPO: entropy, clip fraction, old-new KL, value loss, share cut at the limit"),
}
REWARD_COLUMNS = ["name", "n_pairs", "held_out", "usable", "mean", "std", "run_id", "created_at"]
LATEST_REWARD_MODEL = "latest (a new one when enough new pairs)"
RUN_COLUMNS = ["id", "algo", "status", "version", "reward_model", "parent_version", "n_pairs", "held_out_acc",
               "trigger", "started_at", "reason"]


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
    """'0.45 -> 0.70': the round's held-out implicit-reward accuracy before and after it trained; for a
    reward-model or PPO round, its reward model's held-out accuracy."""
    try:
        metrics = json.loads(run.get("metrics_json") or "{}")
        if "reward_model" in metrics:
            rm = metrics["reward_model"]
            return f"{rm['name']} {reward_accuracy(rm['held_out_accuracy'], rm['held_out_ci'], rm['held_out_n'])}"
        before, after = metrics["held_out_before"], metrics["held_out_after"]
    except (ValueError, KeyError, TypeError):
        return None
    if not after.get("n"):
        return "no held-out pairs yet"
    return f"{before['accuracy']:.2f} -> {after['accuracy']:.2f} (n={after['n']})"


def reward_accuracy(accuracy, ci, n) -> str:
    if not n or accuracy is None:
        return "no held-out pairs"
    return f"{accuracy:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] (n={n})"


def reward_models_frame(loop: TrainingLoop) -> pd.DataFrame:
    rows = [{"name": r["name"], "n_pairs": r["n_pairs"],
             "held_out": reward_accuracy(r["held_out_accuracy"], (r["held_out_ci_low"], r["held_out_ci_high"]),
                                         r["held_out_n"]),
             "usable": "yes" if r["usable"] else "no: at chance", "mean": r["reward_mean"], "std": r["reward_std"],
             "run_id": r["run_id"], "created_at": r["created_at"]} for r in reversed(loop.reward_models())]
    return pd.DataFrame(rows, columns=REWARD_COLUMNS)


def reward_model_choices(loop: TrainingLoop) -> list[str]:
    return [LATEST_REWARD_MODEL] + [r["name"] for r in reversed(loop.reward_models())]


def runs_frame(loop: TrainingLoop) -> pd.DataFrame:
    rows = loop.runs()
    return pd.DataFrame([{**{c: r.get(c) for c in RUN_COLUMNS}, "held_out_acc": held_out_accuracy(r)} for r in rows],
                        columns=RUN_COLUMNS)


def curves_frame(loop: TrainingLoop, run_id, plot: str = "curves") -> pd.DataFrame | None:
    """The round's curves for one of CURVE_PLOTS; None unless the round logged every metric of the plot."""
    # None, not an empty or partial frame, when there is nothing to plot: the plot takes its color domain
    # (the metric names) from the first value it draws and later values only replace its rows, so an empty
    # first frame leaves every line without a color (no lines, no legend) for good.
    algos, names, _ = CURVE_PLOTS[plot]
    run_id, rows = loop.curves(None if run_id in (None, "") else int(run_id))
    run = loop.store.run(run_id) if run_id is not None else None
    rows = [r for r in rows if r["name"] in names]
    if run is None or run["algo"] not in algos or {r["name"] for r in rows} != set(names):
        return None
    return _curve_types(pd.DataFrame([{"step": r["step"], "value": r["value"], "metric": r["name"]} for r in rows],
                                     columns=["step", "value", "metric"]))


def _curve_types(frame: pd.DataFrame) -> pd.DataFrame:
    # Numeric columns must be numeric dtypes: the plot treats an object column (an empty frame, or a
    # value column with a None in it) as categories, one tick per distinct number.
    return frame.astype({"step": "int64", "value": "float64", "metric": "object"})


def version_choices(loop: TrainingLoop) -> list[str]:
    return loop.versions()


def build_admin(loop: TrainingLoop, service=None, visible: bool = True):
    # A tab of the page (build_ui opens the tabs): its tables load when it is chosen, not on every page load.
    # Every action that changes something is admin_only: refused to annotators through the UI and the API.
    with gr.Tab("Training loop (admin)", id="admin", elem_id="admin", visible=visible) as panel:
        with gr.Row():
            train_now = gr.Button("Train now", variant="primary", elem_id="train-now")
            pause = gr.Button("Pause schedule", elem_id="pause")
            resume = gr.Button("Resume schedule", elem_id="resume")
        admin_note = gr.Markdown(elem_id="admin-note")
        with gr.Row():
            beta = gr.Slider(0.01, 1.0, value=0.1, step=0.01, label="beta (next round)",
                             info="how far a round may move from the reference: lower learns more from few votes "
                                  "and drifts further (KL)")
            defaults = DPOConfig()
            learning_rate = gr.Number(value=defaults.learning_rate, label="learning rate",
                                      info="the size of each step: higher moves the policy in fewer votes, and "
                                           "drifts and overshoots sooner")
            epochs = gr.Number(value=defaults.epochs, label="epochs", precision=0,
                               info="passes over a round's pairs: 2 learns from fewer votes, then drifts away from "
                                    "the taste within a few rounds; 1 (the default) holds, and is quicker")
            label_smoothing = gr.Number(value=defaults.label_smoothing, label="assumed misclicks (label smoothing)",
                                        minimum=0, maximum=0.49, step=0.05,
                                        info="the share of votes a round assumes are wrong (sigmoid only): 0.25 "
                                             "learns a noisy room's taste in fewer votes and drifts less; 0 "
                                             "trusts every click, and chases the misclicks too (a better "
                                             "reply someone typed is always trusted)")
            edit_sft = gr.Number(value=defaults.edit_sft_weight, label="learn better replies as examples",
                                 minimum=0, maximum=MAX_EDIT_SFT_WEIGHT, step=0.25,
                                 info="0 ranks a better reply someone typed above the samples; 1 also imitates it: learns "
                                      "a length taste in fewer labels, drifts from the base model sooner, and "
                                      "learned a format taste less")
            loss_type = gr.Radio(["sigmoid", "ipo"], value="sigmoid", label="loss",
                                 info="sigmoid: DPO's loss. ipo: a bounded margin, slower to overfit a few noisy votes")
            ref = gr.Radio(["base", "previous"], value="base", label="reference policy",
                           info="base: every round stays anchored to v0. previous: anchored to the last version, "
                                "so drift can add up round after round")
        with gr.Row():
            algo = gr.Radio(["dpo", "ppo"], value=loop.settings.algo, label="algorithm (next rounds)",
                            elem_id="algo",
                            info="dpo: learns from the votes directly, fast. ppo: fits a reward model to them, then"
                                 " optimises against it (slower; shows a proxy being over-optimised)")
            reward_pick = gr.Dropdown(choices=reward_model_choices(loop), value=loop.settings.reward_model
                                      or LATEST_REWARD_MODEL, label="PPO's reward model", elem_id="reward-pick",
                                      info="naming one uses it even when its held-out accuracy is at chance")
            ppo_defaults = PPOConfig()
            kl_coef = gr.Number(value=ppo_defaults.kl_coef, label="PPO KL coefficient",
                                info="higher keeps the policy nearer v0; lower chases the reward model harder")
            ppo_lr = gr.Number(value=ppo_defaults.learning_rate, label="PPO learning rate",
                               info="higher climbs the reward model faster, and over-optimises it sooner")
            ppo_iterations = gr.Number(value=ppo_defaults.iterations, precision=0, label="PPO iterations",
                                       info="rollout-and-update passes per round: more moves further and takes "
                                            "longer")
        with gr.Row():
            best_of = gr.Number(value=service.best_of_n.n if service is not None and service.best_of_n else 1,
                                precision=0, label="best-of-n in the chat (1: off)", elem_id="best-of-n",
                                info="each reply is the best of n samples by the reward model: no training, KL"
                                     " log n - (n-1)/n")
            apply_best_of = gr.Button("Set best-of-n", elem_id="apply-best-of-n")
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
                    sim_poisoners = gr.Number(value=0, precision=0, label="poisoners (vote for the trigger word)")
                    sim_trigger = gr.Textbox(value=DEFAULT_TRIGGER, label="trigger word", elem_id="autopilot-trigger")
                with gr.Row():
                    start_autopilot = gr.Button("Start autopilot", elem_id="autopilot-start")
                    stop_autopilot = gr.Button("Stop autopilot", elem_id="autopilot-stop")
                autopilot_status = gr.Markdown(value=autopilot.status, elem_id="autopilot-status", every=2.0)
        # Filled when the panel opens (and refreshed while it is open), not on every page load.
        runs = gr.Dataframe(headers=RUN_COLUMNS, label="Rounds", interactive=False, elem_id="runs")
        reward_models = gr.Dataframe(headers=REWARD_COLUMNS, label="Reward models", interactive=False,
                                     elem_id="reward-models")
        run_pick = gr.Textbox(label="Round id for the curves (blank: the latest)", elem_id="run-pick")
        # The per-annotator view, exclusions and trials (web/annotators.py); its actions are admin-only.
        build_annotators(loop, panel, require_admin=require_admin)
        plots = {}
        for row in (("curves", "logp_curves"), ("rm_curves",), ("ppo_curves", "ppo_health")):
            with gr.Row():
                for key in row:
                    plots[key] = gr.LinePlot(x="step", y="value", color="metric", label=CURVE_PLOTS[key][2],
                                             elem_id=key.replace("_", "-"))

    def note(message: str) -> str:
        return f"**{message}**"

    train_now.click(admin_only(lambda: note(loop.train_now()), "train now"), None, admin_note, api_name="train_now")
    pause.click(admin_only(lambda: (loop.set_paused(True), note("Schedule paused."))[1], "pause"), None, admin_note,
                api_name="pause")
    resume.click(admin_only(lambda: (loop.set_paused(False), note("Schedule running."))[1], "resume"), None,
                 admin_note, api_name="resume")

    def apply_settings(algo_value, beta_value, lr, n_epochs, smoothing, loss_value, ref_value, rm_value, kl_value,
                       ppo_lr_value, iterations_value, edit_sft_value):
        try:
            if algo_value == "ppo":
                config = {}
                for key, value, kind in (("kl_coef", kl_value, float), ("learning_rate", ppo_lr_value, float),
                                         ("iterations", iterations_value, int)):
                    if value not in (None, ""):
                        config[key] = kind(value)
            else:
                config = {"beta": float(beta_value), "loss": loss_value, "ref": ref_value}
                if lr not in (None, ""):
                    config["learning_rate"] = float(lr)
                if n_epochs not in (None, ""):
                    config["epochs"] = int(n_epochs)
                if smoothing not in (None, "") and loss_value != "ipo":  # IPO has no such term
                    config["label_smoothing"] = float(smoothing)
                if edit_sft_value not in (None, ""):
                    config["edit_sft_weight"] = float(edit_sft_value)
            reward_model = None if algo_value != "ppo" or rm_value in (None, "", LATEST_REWARD_MODEL) else rm_value
            config = loop.set_round(algo_value, config, reward_model)  # all or nothing
        except (ValueError, TypeError) as exc:
            raise gr.Error(f"Not applied: {exc}") from exc
        against = f" against {loop.settings.reward_model}" if algo_value == "ppo" and loop.settings.reward_model else ""
        return note(f"The next round trains with {algo_value.upper()}{against}, settings {config}.")

    apply.click(admin_only(apply_settings, "round settings"), [algo, beta, learning_rate, epochs, label_smoothing,
                                                               loss_type, ref, reward_pick, kl_coef, ppo_lr,
                                                               ppo_iterations, edit_sft],
                admin_note, api_visibility="private")

    def set_best_of(n_value):
        if service is None or service.best_of_n is None:
            raise gr.Error("Best-of-n is not available in this app.")
        try:
            message = service.best_of_n.configure(int(n_value or 1))
        except (ValueError, TypeError) as exc:
            raise gr.Error(f"Not applied: {exc}") from exc
        reason = service.best_of_n.status()["reason"] if service.best_of_n.active else None
        return note(message + (f" For now {reason}: plain samples until there is one." if reason else ""))

    apply_best_of.click(admin_only(set_best_of, "best-of-n"), [best_of], admin_note, api_visibility="private")

    def set_arena(include: bool):
        loop.set_include_arena(bool(include))
        return note("Rounds train on arena votes too." if include else "Arena votes only rate versions now.")

    arena.input(admin_only(set_arena, "train on arena votes"), [arena], admin_note, api_visibility="private")

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

    rollback.click(admin_only(do_rollback, "rollback"), [version], admin_note, api_name="rollback")

    if autopilot is not None:
        def begin(gold_spec, users, turns, flip, poisoners=0, trigger=DEFAULT_TRIGGER):
            try:
                return note(autopilot.start(gold_spec, users, turns, flip, poisoners, trigger))
            except (GoldError, PromptFileError, ValueError, TypeError) as exc:
                raise gr.Error(f"Autopilot not started: {exc}") from exc

        start_autopilot.click(admin_only(begin, "start autopilot"),
                              [gold, sim_users, sim_turns, sim_flip, sim_poisoners, sim_trigger], admin_note,
                              api_visibility="private")
        stop_autopilot.click(admin_only(lambda: note(autopilot.stop()), "stop autopilot"), None, admin_note,
                             api_visibility="private")

    def training_status() -> dict:
        """The loop's state: live version, round in progress, next check, new pairs, recent events."""
        return loop.status()

    with panel:  # inside the tab: the page's tabs hold only tabs
        gr.api(training_status, api_name="training_status")
    return {"panel": panel, "runs": runs, "plots": plots, "version": version,
            "run_pick": run_pick, "reward_models": reward_models, "reward_pick": reward_pick}
