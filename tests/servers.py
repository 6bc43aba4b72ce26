"""Launch the real Gradio app in-process on a free loopback port, for the API and browser tests."""

from __future__ import annotations

import contextlib
import socket

from playground.chat import ChatService
from playground.loop import LoopSettings, TrainingLoop
from playground.policy import PolicyHolder
from playground.ui import build_ui, launch
from store import Store


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(loaded, db_path, busy_timeout_ms: int = 200, loop_settings: dict | None = None):
    """Yields (url, service) — or (url, service, loop) when loop_settings are given."""
    store = Store(db_path, busy_timeout_ms=busy_timeout_ms)
    store.ensure_base_version(loaded.model_id)
    policy = PolicyHolder(loaded)
    loop = None
    if loop_settings is not None:
        loop = TrainingLoop(LoopSettings(db=str(db_path), model=loaded.model_id, **loop_settings), store, policy)
    service = ChatService(policy, store, on_feedback=None if loop is None else loop.nudge)  # as app.py wires it
    if loop is not None:
        loop.start()
    demo = build_ui(service, loop)
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        yield (f"http://127.0.0.1:{port}/", service) if loop is None else (f"http://127.0.0.1:{port}/", service, loop)
    finally:
        if loop is not None:
            loop.shutdown()
        demo.close()
        store.close()
