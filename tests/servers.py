"""Launch the real Gradio app in-process on a free loopback port, for the API and browser tests."""

from __future__ import annotations

import contextlib
import socket

from playground.chat import ChatService
from playground.policy import PolicyHolder
from playground.ui import build_ui, launch
from store import Store


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(loaded, db_path, busy_timeout_ms: int = 200):
    store = Store(db_path, busy_timeout_ms=busy_timeout_ms)
    store.ensure_base_version(loaded.model_id)
    service = ChatService(PolicyHolder(loaded), store)
    demo = build_ui(service)
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", service
    finally:
        demo.close()
        store.close()
