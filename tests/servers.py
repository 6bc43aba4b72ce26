"""Launch the real app in-process on a free loopback port, for the API and browser tests.

The services come from app.py's composition root, `build_services`, and the server from its `serve`, so
the tests run what ships.
"""

from __future__ import annotations

import contextlib

from app import build_services, parse_args, serve
from bench.fixtures import free_port


def app_args(loaded, db_path, loop_settings: dict | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """app.py's command line for these settings (no loop settings: the schedule off, as --no-train)."""
    settings = dict(loop_settings or {})
    argv = ["--model", loaded.model_id, "--db", str(db_path)]
    flags = {"adapters_dir": "--adapters-dir", "model_cache": "--model-cache", "train_every_min": "--train-every",
             "min_new_pairs": "--min-new-pairs", "algo": "--algo", "reward_models_dir": "--reward-models-dir"}
    for key, flag in flags.items():
        if key in settings:
            argv += [flag, str(settings.pop(key))]
    if not settings.pop("enabled", loop_settings is not None):
        argv.append("--no-train")
    settings.pop("device", None)  # the loop trains where the app serves, as app.py decides
    if settings:
        raise TypeError(f"unknown loop settings {sorted(settings)}")
    # No blind arena pairs unless a test asks (extra's --arena-rate comes later and wins): a test that
    # checks which version wrote a reply must not meet a random arena turn. No background evaluation
    # unless a test gives its own (small) probe file: 64 probes on every test server would only load the CPU.
    argv += ["--arena-rate", "0"]
    if "--probes" not in extra:
        argv.append("--no-eval")
    return argv + list(extra)


@contextlib.contextmanager
def running_app(loaded, db_path, busy_timeout_ms: int = 200, loop_settings: dict | None = None,
                extra_args: tuple[str, ...] = (), clock=None):
    """Yields (url, service) — or (url, service, loop) when loop_settings are given. `extra_args`: more
    app.py flags (`--auth` puts it behind sign-in); `clock`: the sign-in clock, for session expiry."""
    port = free_port()
    args = parse_args(app_args(loaded, db_path, loop_settings, (*extra_args, "--port", str(port))))
    services = build_services(args, loaded=loaded, busy_timeout_ms=busy_timeout_ms)
    demo = None
    try:
        demo = serve(services, args, prevent_thread_lock=True, clock=clock, quiet=True)  # as app.py's main
        url = f"http://127.0.0.1:{port}/"
        yield (url, services.chat) if loop_settings is None else (url, services.chat, services.loop)
    finally:
        if demo is not None:
            demo.close()
        services.close()
