"""The live loop inside the app: scheduled rounds in a subprocess, then a hot-swap of the new version.

Every `train_every` minutes APScheduler calls `check()`, and each saved judgment moves that check to
now (`nudge()`): when at least `min_new_pairs` new training pairs exist and no round is running, it
records a round and starts `python -m trainers.run` as a subprocess. A watcher thread waits for it;
when the round succeeded, the new adapter is verified, made resident in the base model's engine (for a
model the engine does not run, on the PEFT host; merged into a copy where neither applies:
`adapters.version_snapshot`) and made live
(`PolicyHolder.set_live`), which new requests pick up while generations already streaming finish on
the version they started with. `on_live` (the evaluator) hears of each version that goes live. Rollback is the
same swap to an older version, recorded as such. A round killed mid-way leaves the live version
serving and is marked failed; its half-written folder is never loaded.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from playground.serving.adapters import AdapterError, version_snapshot
from playground.serving.policy import BASE_VERSION, PolicyHolder
from store import Store, StoreError
from trainers.data import count_new_pairs
from trainers.dpo import DPOConfig
from trainers.defaults import (DEFAULT_ALGO, DEFAULT_REWARD_MODELS_DIR, DEFAULT_TRAIN_EVERY_MIN, MANUAL_MIN_NEW_PAIRS,
                               SCHEDULE_ALGOS, SCHEDULE_MIN_NEW_PAIRS)
from trainers.procenv import training_env

log = logging.getLogger(__name__)

TRAINER_NICENESS = 10
STATUS_CACHE_S = 1.0
RUNS_SHOWN = 20  # rounds in the admin panel's table
SHUTDOWN_WAIT_S = 10.0  # for a terminated trainer's watcher to record the round's end
INTERRUPTED = "interrupted: the app stopped while the round was running"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LoopSettings:
    db: str
    adapters_dir: str
    model: str
    model_cache: str
    device: str = "cpu"
    train_every_min: float = DEFAULT_TRAIN_EVERY_MIN
    min_new_pairs: int = SCHEDULE_MIN_NEW_PAIRS
    enabled: bool = True
    include_simulated: bool = True  # train on the autopilot's simulated votes too (a demo's whole point)
    include_arena: bool = False  # train on arena votes (two versions shown blind) too: the admin's call
    next_config: dict = field(default_factory=dict)  # the algorithm's settings for the next round: set_next_config()
    algo: str = DEFAULT_ALGO  # 'dpo' or 'ppo' (a reward model, then PPO against it): set_algo()
    reward_models_dir: str = DEFAULT_REWARD_MODELS_DIR
    # A PPO round's reward model: None for the latest (a new one when enough new pairs arrived), or a name
    # the admin chose, used even when its held-out accuracy is at chance.
    reward_model: str | None = None


def config_class(algo: str):
    """The settings dataclass of a schedulable algorithm."""
    if algo == "dpo":
        return DPOConfig
    if algo == "ppo":
        from trainers.ppo import PPOConfig

        return PPOConfig
    raise ValueError(f"algorithm {algo!r} is not one of {SCHEDULE_ALGOS}")


def checked_config(algo: str, config: dict) -> dict:
    """A copy of `config`, checked as the algorithm's settings dataclass takes it; ValueError naming what
    is wrong (an unknown setting, or a value the dataclass refuses)."""
    cls = config_class(algo)
    config = dict(config)
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {algo.upper()} settings {unknown}")
    try:
        cls(**config)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc
    return config


class TrainingLoop:
    def __init__(self, settings: LoopSettings, store: Store, policy: PolicyHolder,
                 on_live: Callable[[str], None] | None = None):
        self.settings = settings
        self._on_live = on_live  # told each version that goes live (promote, rollback, the restore at start)
        self.store = store
        self.policy = policy
        self.paused = not settings.enabled
        self.events: list[dict] = []  # what happened, newest last: promotions, refusals, failures
        self.last_swap_s: float | None = None  # the switch of the live reference itself
        self.last_load_s: float | None = None  # verifying and merging the adapter before the switch
        self._lock = threading.Lock()  # one round at a time; guards _process
        self._swap_lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._watcher: threading.Thread | None = None
        # Set from a round's start until its version is live (or it failed): the next round must see the
        # previous one's version as its parent, so it may start only after the promotion, not at process exit.
        self._round_active = threading.Event()
        self._scheduler = BackgroundScheduler(daemon=True)
        self._job = None
        # False after a round failed or was skipped: then votes stop nudging (a round that fails on the
        # waiting pairs would be retried on every click) and only the schedule retries, at its pace.
        self._nudges = True
        self._status_cache: tuple[float, dict] | None = None
        self._status_lock = threading.Lock()  # one computation per second for every open tab
        self._status_generation = 0  # +1 per event: a status computed across an event is not cached
        self._config_lock = threading.Lock()

    # -- start and stop ---------------------------------------------------------------------------

    def start(self) -> None:
        for run_id in self.store.fail_interrupted_runs(INTERRUPTED):
            self._event("failed", f"round {run_id} was interrupted by a restart")
        live = self.store.live_version(self.policy.model_id)
        if live and live != BASE_VERSION:
            try:
                self._swap(live, action=None)
                self._notify_live(live)
            except (AdapterError, StoreError) as exc:
                self._event("refused", f"{live} could not be restored ({exc}); serving v0")
                self.store.record_live(self.policy.model_id, BASE_VERSION, "rollback", f"restore failed: {exc}")
        elif live is None:
            self.store.record_live(self.policy.model_id, BASE_VERSION, "start")
        if self.settings.enabled:
            seconds = max(1.0, self.settings.train_every_min * 60)
            # misfire_grace_time=None: a nudged check that the scheduler's thread reaches late still runs.
            self._job = self._scheduler.add_job(self.check, "interval", seconds=seconds, id="train-check",
                                                max_instances=1, coalesce=True, misfire_grace_time=None)
            self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._process.terminate()
            watcher = self._watcher
        # Let the watcher record how the round ended before the caller closes the store under it.
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=SHUTDOWN_WAIT_S)

    # -- rounds -----------------------------------------------------------------------------------

    def check(self) -> str:
        """The scheduled check: start a round when enough new pairs wait and none is running."""
        if self.paused:
            return "the schedule is paused"
        return self.start_round(trigger="schedule", min_new_pairs=self.settings.min_new_pairs)

    def nudge(self) -> None:
        """A judgment was saved: run the scheduled check now instead of at its next tick, so the vote that
        reaches --min-new-pairs starts the round at once (the schedule then counts on from here). The
        check decides as always (threshold, one round at a time); this only moves it earlier, on the
        scheduler's thread, and returns at once. Nothing happens while paused, while a round is running,
        or after a round failed or was skipped."""
        if self._job is None or self.paused or not self._nudges or self._round_active.is_set():
            return
        try:
            self._job.modify(next_run_time=datetime.datetime.now(datetime.timezone.utc))
        except Exception:  # the scheduler is shutting down: the vote is saved, there is nothing to nudge
            log.debug("nudge ignored", exc_info=True)

    def train_now(self) -> str:
        return self.start_round(trigger="manual", min_new_pairs=MANUAL_MIN_NEW_PAIRS)

    def start_trial(self, user: str) -> str:
        """Two rounds that publish nothing, with and without `user`'s pairs (trainers/trial.py), in the
        round's slot (one round at a time); the result lands on the round's record."""
        return self.start_round(trigger=f"trial:{user}", min_new_pairs=0, trial_without=user)

    def exclude_annotator(self, user: str, by_user: str, reason: str = "") -> dict:
        """Leave `user`'s pairs out of the next rounds (recorded; `include_annotator` undoes it)."""
        row = self.store.exclude_annotator(user, by_user, reason)
        self._event("settings", f"{row['user']} is excluded from training (by {by_user})")
        return row

    def include_annotator(self, user: str, by_user: str, reason: str = "") -> dict:
        row = self.store.include_annotator(user, by_user, reason)
        self._event("settings", f"{row['user']} is included in training again (by {by_user})")
        return row

    def start_round(self, trigger: str, min_new_pairs: int, trial_without: str | None = None) -> str:
        with self._lock:
            if self._round_active.is_set():
                return "a round is already running"
            new = self.new_pairs()
            if new < min_new_pairs:
                return f"{new} new pair(s); a round needs {min_new_pairs}"
            parent = self.policy.snapshot().version
            config = self.next_config()
            algo = self.settings.algo
            if trial_without:  # a trial is DPO (with the next round's DPO settings) whatever the schedule's algorithm
                algo, config = "dpo", (config if algo == "dpo" else {})
            run_id = self.store.create_run(algo, config, self.policy.model_id, parent, trigger)
            command = [
                sys.executable, "-m", "trainers.run", "--algo", algo, "--db", self.settings.db,
                "--adapters-dir", self.settings.adapters_dir, "--model", self.settings.model,
                "--model-cache", self.settings.model_cache, "--device", self.settings.device,
                "--run-id", str(run_id), "--trigger", trigger, "--min-new-pairs", str(min_new_pairs),
                "--config", json.dumps(config), "--no-progress",
            ] + ([] if self.settings.include_simulated else ["--exclude-simulated"])
            command += ["--include-arena"] if self.settings.include_arena else []
            if trial_without:
                command += ["--trial-without", trial_without]
            elif algo == "ppo":
                command += ["--reward-models-dir", self.settings.reward_models_dir]
                command += ["--reward-model", self.settings.reward_model] if self.settings.reward_model else []
            # Niced: on a small machine the chat's decoding keeps priority over the round.
            self._round_active.set()
            try:
                self._process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 text=True, env=training_env(),
                                                 preexec_fn=lambda: os.nice(TRAINER_NICENESS))
            except OSError as exc:
                self._round_active.clear()
                self.store.fail_run_if_running(run_id, f"the trainer could not start: {exc}")
                return f"round {run_id} could not start: {exc}"
            self.store.set_run_pid(run_id, self._process.pid)
            self._watcher = threading.Thread(target=self._watch, args=(self._process, run_id), daemon=True,
                                             name=f"round-{run_id}")
            self._watcher.start()
            if trial_without:
                self._event("started", f"round {run_id}: a trial with and without {trial_without}, publishing nothing")
                return f"round {run_id} started: a trial with and without {trial_without} (publishes nothing)"
            self._event("started", f"round {run_id} started ({trigger}) on {new} new pair(s)")
            return f"round {run_id} started on {new} new pair(s)"

    def _watch(self, process: subprocess.Popen, run_id: int) -> None:
        try:
            self._finish_round(process, run_id)
        finally:
            self._round_active.clear()
        self.nudge()  # votes that arrived during the round may already make the next one

    def _finish_round(self, process: subprocess.Popen, run_id: int) -> None:
        _, stderr = process.communicate()
        if process.returncode < 0:
            reason = f"the trainer was killed by signal {-process.returncode}"
        elif process.returncode != 0:
            tail = (stderr or "").strip().splitlines()[-1:] or ["no output"]
            reason = f"the trainer exited with status {process.returncode}: {tail[0][:300]}"
        else:
            reason = None
        if reason and self.store.fail_run_if_running(run_id, reason):
            self._event("failed", f"round {run_id}: {reason}")
        run = self.store.run(run_id) or {}
        self._nudges = run.get("status") == "succeeded"
        if run.get("status") == "succeeded" and run.get("version"):
            try:
                self.promote(run["version"], action="promote")
            except (AdapterError, StoreError) as exc:
                self._event("refused", f"{run['version']} was not served: {exc}")
        elif run.get("status") in ("failed", "skipped"):
            self._event(run["status"], f"round {run_id}: {run.get('reason')}")

    # -- versions ---------------------------------------------------------------------------------

    def promote(self, version: str, action: str = "promote", note: str | None = None) -> float:
        """Make a version live (verified first); returns the seconds the swap itself took."""
        swap_s = self._swap(version, action=action, note=note)
        self._event(action, f"{version} is live")
        self._notify_live(version)
        return swap_s

    def _notify_live(self, version: str) -> None:
        if self._on_live is None:
            return
        try:
            self._on_live(version)
        except Exception:  # the version is live whatever the listener (the evaluator) makes of it
            log.exception("the on_live hook failed for %s", version)

    def rollback(self, version: str) -> float:
        return self.promote(version, action="rollback", note=f"rolled back from {self.policy.snapshot().version}")

    def _swap(self, version: str, action: str | None, note: str | None = None) -> float:
        with self._swap_lock:
            loading = time.perf_counter()
            if version == BASE_VERSION:
                snapshot = self.policy.base
            else:
                row = self.store.version(self.policy.model_id, version)
                if row is None:
                    raise AdapterError(f"no version {version} for {self.policy.model_id}")
                # Load and verify before the swap: the live version keeps serving all the while. Served as
                # its adapter on the base engine where it can be (a rollback to a resident version is only
                # a switch), else as a merged copy with its own engine built now.
                snapshot = version_snapshot(self.policy, version, Path(row["adapter_dir"]))
            self.last_load_s = time.perf_counter() - loading
            started = time.perf_counter()
            self.policy.set_live(snapshot)
            self.last_swap_s = time.perf_counter() - started
            if action is not None:
                self.store.record_live(self.policy.model_id, version, action, note)
            return self.last_swap_s

    # -- what the UI shows ------------------------------------------------------------------------

    def status(self) -> dict:
        # Every open tab polls this; one computation per second serves them all (the lock makes the
        # tabs whose timers fire together wait for that one computation instead of each doing it).
        with self._status_lock:
            cached = self._status_cache
            if cached is not None and time.monotonic() - cached[0] < STATUS_CACHE_S:
                return cached[1]
            generation = self._status_generation
            status = self._compute_status()
            # An event (a promotion, say) during the computation may have made it stale: then serve it
            # this once and keep no copy, so the next poll sees the event.
            if generation == self._status_generation:
                self._status_cache = (time.monotonic(), status)
            return status

    def runs(self, limit: int = RUNS_SHOWN) -> list[dict]:
        """The newest rounds, newest first (the admin panel's table)."""
        return self.store.runs(limit=limit)

    def curves(self, run_id: int | None = None) -> tuple[int | None, list[dict]]:
        """(round id, its step curves as {step, name, value}); without an id, the newest round that has
        logged a step (a round just starting has none yet)."""
        if run_id is None:
            logged = [r for r in self.store.runs(limit=RUNS_SHOWN) if r["step"]]
            if not logged:
                return None, []
            run_id = logged[0]["id"]
        return run_id, self.store.metrics_for_run(int(run_id))

    def versions(self) -> list[str]:
        """Every version of the served model, oldest first (v0 is the base model)."""
        return [v["name"] for v in self.store.policy_versions(self.policy.model_id)]

    def next_config(self) -> dict:
        with self._config_lock:
            return dict(self.settings.next_config)

    def set_next_config(self, config: dict, algo: str | None = None) -> dict:
        """Validate the settings of `algo` (default: the schedule's) and use them, and that algorithm, from
        the next round on; raises ValueError naming what is wrong. Returns the settings as they will be used."""
        algo = algo or self.settings.algo
        config = checked_config(algo, config)
        with self._config_lock:
            if algo != self.settings.algo:
                self._event("settings", f"the next rounds train with {algo.upper()}")
            self.settings.algo = algo
            self.settings.next_config = config
        self._invalidate_status()
        return dict(config)

    def set_round(self, algo: str, config: dict, reward_model: str | None = None) -> dict:
        """The algorithm, its settings and (PPO) the reward model of the next rounds, all validated before
        any is applied: a bad value changes nothing. Raises ValueError naming it."""
        config = checked_config(algo, config)
        self.set_algo(algo, reward_model)  # checks the reward model before it changes anything
        return self.set_next_config(config, algo)

    def set_algo(self, algo: str, reward_model: str | None = None) -> None:
        """The algorithm of the next rounds, with its default settings; for PPO optionally a reward model
        chosen by name (used even at chance: the admin's explicit choice)."""
        config_class(algo)  # raises for an unknown algorithm
        if reward_model and self.store.reward_model(self.policy.model_id, reward_model) is None:
            raise ValueError(f"there is no reward model {reward_model}")
        with self._config_lock:
            changed = algo != self.settings.algo
            self.settings.algo = algo
            if changed:
                self.settings.next_config = {}
            self.settings.reward_model = reward_model or None
        self._event("settings", f"the next rounds train with {algo.upper()}"
                    + (f" against {reward_model}" if algo == "ppo" and reward_model else ""))

    def reward_models(self) -> list[dict]:
        """Every reward model of the served model, oldest first."""
        return self.store.reward_models(self.policy.model_id)

    def _compute_status(self) -> dict:
        running = self.store.running_run()
        next_check = None
        if self._job is not None and not self.paused and self._job.next_run_time is not None:
            next_check = self._job.next_run_time.astimezone(datetime.timezone.utc).isoformat(timespec="seconds")
        return {
            "live": self.policy.snapshot().version,
            "running": None if running is None else {
                "run_id": running["id"], "step": running["step"] or 0, "total_steps": running["total_steps"],
                "loss": running["loss"]},
            "next_check": next_check,
            "new_pairs": self.new_pairs(),
            "min_new_pairs": self.settings.min_new_pairs,
            "paused": self.paused,
            "enabled": self.settings.enabled,
            "algo": self.settings.algo,
            "reward_model": self.settings.reward_model,
            "events": self.events[-5:],
            "last_swap_s": self.last_swap_s,
            "last_load_s": self.last_load_s,
        }

    def new_pairs(self) -> int:
        """New pairs the next round would train on: the trainer's own definition, at the next round's length limit."""
        max_length = self.next_config().get("max_length", DPOConfig.max_length) if self.settings.algo == "dpo" \
            else DPOConfig.max_length
        return count_new_pairs(self.store, self.policy.model_id, self.settings.include_simulated, max_length,
                               include_arena=self.settings.include_arena)

    def set_include_arena(self, include: bool) -> None:
        """Whether rounds train on arena votes too (the admin's call; by default they only rate versions)."""
        self.settings.include_arena = include
        self._event("settings", "rounds " + ("train on" if include else "leave out") + " arena votes")

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self._event("paused" if paused else "resumed", "the schedule is " + ("paused" if paused else "running"))

    def _invalidate_status(self) -> None:
        self._status_generation += 1
        self._status_cache = None

    def _event(self, kind: str, message: str) -> None:
        log.info("%s: %s", kind, message)
        self._invalidate_status()
        self.events.append({"kind": kind, "message": message,
                            "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        del self.events[:-50]
