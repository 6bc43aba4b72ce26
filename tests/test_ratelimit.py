"""Per-person rate limits: the sliding window on a clock stepped by hand, the chat refusing past the limit
with the time to wait, and a flood through a real server refused in words while others carry on."""

from __future__ import annotations

import threading

import pytest

from playground.chat import ChatError, ChatService, ChatSession, limit_key
from playground.ratelimit import DEFAULT_VOTES_PER_MINUTE, SWEEP_EVERY, RateLimiter, wait_text
from playground.serving.generation import SamplingSettings
from playground.serving.policy import PolicyHolder
from store import Store

FAST = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=4)


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_window_allows_the_limit_then_says_how_long_to_wait():
    clock = Clock()
    limiter = RateLimiter(3, clock=clock)
    for _ in range(3):
        assert limiter.acquire("k") == 0.0
        clock.t += 10
    assert limiter.acquire("k") == pytest.approx(30.0)  # at 30 s: until the first of the three leaves
    assert limiter.acquire("k") == pytest.approx(30.0)  # a refusal counts nothing
    clock.t += 30
    assert limiter.acquire("k") == 0.0  # the first one left exactly now
    assert limiter.acquire("k") == pytest.approx(10.0)  # the next to leave is the one made at 10 s


def test_keys_are_apart_and_a_sliding_window_has_no_burst_at_the_minute():
    clock = Clock()
    limiter = RateLimiter(2, clock=clock)
    limiter.acquire("alice")
    clock.t += 50
    limiter.acquire("alice")
    assert limiter.acquire("bob") == 0.0 and limiter.acquire("bob") == 0.0
    clock.t += 11  # 61 s after alice's first: one slot back, not two (a fixed minute would reset both)
    assert limiter.acquire("alice") == 0.0
    assert limiter.acquire("alice") == pytest.approx(49.0)  # until the one made at 50 s leaves


def test_idle_keys_are_swept():
    clock = Clock()
    limiter = RateLimiter(1, clock=clock)
    for i in range(10):
        limiter.acquire(f"tab-{i}")
    clock.t += 61
    for _ in range(SWEEP_EVERY):
        limiter.acquire("busy")
    assert limiter.keys() == 1


def test_threads_at_once_get_exactly_the_limit():
    limiter = RateLimiter(25, clock=Clock())
    admitted = []
    barrier = threading.Barrier(8)

    def hammer():
        barrier.wait()
        admitted.extend(w == 0.0 for w in (limiter.acquire("k") for _ in range(20)))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 25 and len(admitted) == 160


@pytest.mark.parametrize("bad", [0, -1])
def test_a_limit_below_one_is_refused(bad):
    with pytest.raises(ValueError, match="at least 1"):
        RateLimiter(bad)


def test_waits_read_as_whole_seconds():
    assert [wait_text(s) for s in (0.01, 1.0, 11.2, 59.999)] == ["1 s", "1 s", "12 s", "60 s"]


@pytest.fixture
def limited(tiny_loaded, tmp_path):
    """A chat service allowing 2 messages and 2 judgments a minute on a hand-stepped clock."""
    store = Store(tmp_path / "limits.db")
    clock = Clock()
    service = ChatService(PolicyHolder(tiny_loaded), store, message_limiter=RateLimiter(2, clock=clock),
                          judgment_limiter=RateLimiter(2, clock=clock))
    yield service, clock
    store.close()


def send(service, session, text):
    *_, pair = service.send(session, text, FAST)
    return pair


def test_the_chat_refuses_past_the_message_limit_naming_it_and_the_wait(limited):
    service, clock = limited
    session = ChatSession()
    send(service, session, "one")
    clock.t += 12
    *_, regenerated = service.regenerate(session, FAST)  # a regenerate counts as a message
    before = service.store.stats()
    with pytest.raises(ChatError, match=r"You can send 2 messages a minute .*try again in 48 s\. Nothing was sent"):
        send(service, session, "three")
    with pytest.raises(ChatError, match="try again in 48 s"):
        list(service.regenerate(session, FAST))
    after = service.store.stats()
    assert (after["turns"], after["replies"]) == (before["turns"], before["replies"])
    assert session.pair is regenerated and session.user_message == "one"  # the refused send changed nothing
    clock.t += 48
    assert send(service, session, "three").reply_ids


def test_the_chat_refuses_past_the_judgment_limit(limited):
    service, clock = limited
    session = ChatSession()
    send(service, session, "q")
    service.vote(session, "a")
    service.rate(session, "b", "down")
    with pytest.raises(ChatError, match=r"You can judge 2 times a minute .*try again in 60 s\. Nothing was recorded"):
        service.edit(session, "a better reply")
    with pytest.raises(ChatError, match="You can judge 2 times"):
        service.vote(session, "b")
    assert service.store.stats()["feedback"] == 2 and session.pair.choice == "a"
    with pytest.raises(ChatError, match="Unknown choice"):  # a refused judgment is not counted, nor is a bad one
        service.vote(session, "c")


def test_anonymous_sessions_have_their_own_allowance_and_an_account_shares_one(limited):
    service, _ = limited
    first, second = ChatSession(), ChatSession()
    assert limit_key(first) != limit_key(second)  # without accounts every browser is "anonymous"
    for session in (first, second):
        send(service, session, "one")
        send(service, session, "two")
    tab_one, tab_two = ChatSession(user="alice"), ChatSession(user="alice")
    send(service, tab_one, "one")
    send(service, tab_two, "two")
    with pytest.raises(ChatError, match="You can send 2 messages"):
        send(service, tab_one, "three")
    autopilot = ChatSession(user="alice", limits_exempt=True)  # the admin's in-process autopilot
    send(service, autopilot, "not limited")


def test_a_flood_through_the_server_is_refused_in_words_and_others_carry_on(tiny_loaded, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from tests.servers import running_app

    args = ("--rate-limit-messages", "3", "--rate-limit-votes", "2")
    with running_app(tiny_loaded, tmp_path / "flood.db", extra_args=args) as (url, service):
        assert (service.message_limiter.limit, service.judgment_limiter.limit) == (3, 2)
        clock = Clock()  # time stands still: the flood is inside one minute however slow the machine
        service.message_limiter.clock = service.judgment_limiter.clock = clock
        flooder, other = Client(url, verbose=False), Client(url, verbose=False)
        for i in range(3):
            flooder.predict(f"flood {i}", api_name="/send", max_new_tokens=4)
        with pytest.raises(AppError, match=r"You can send 3 messages a minute .*try again in 60 s"):
            flooder.predict("flood 3", api_name="/send", max_new_tokens=4)
        with pytest.raises(AppError, match="You can send 3 messages a minute"):
            flooder.predict(api_name="/regenerate", max_new_tokens=4)
        flooder.predict("a", api_name="/vote")
        flooder.predict("b", api_name="/vote")
        with pytest.raises(AppError, match=r"You can judge 2 times a minute .*try again in 60 s"):
            flooder.predict("a", api_name="/vote")
        assert other.predict("I am someone else", api_name="/send", max_new_tokens=4)["saved"]
        assert other.predict("a", api_name="/vote")["choice"] == "a"
        stats = service.store.stats()
        assert stats["turns"] == 4 and stats["current_feedback"] == {"choice": {"b": 1, "a": 1}}
        clock.t += 60
        assert flooder.predict("after a minute", api_name="/send", max_new_tokens=4)["saved"]


@pytest.mark.parametrize("flag", ["--rate-limit-messages", "--rate-limit-votes"])
def test_a_negative_limit_stops_the_start_and_zero_turns_a_limit_off(flag, capsys):
    from app import parse_args

    with pytest.raises(SystemExit):
        parse_args([flag, "-1"])
    assert f"{flag} -1 must be 0 (no limit) or more" in capsys.readouterr().err
    assert getattr(parse_args([flag, "0"]), flag[2:].replace("-", "_")) == 0


def test_with_a_limit_off_the_service_gets_no_limiter(tiny_loaded, tmp_path):
    from tests.servers import running_app

    with running_app(tiny_loaded, tmp_path / "off.db", extra_args=("--rate-limit-messages", "0")) as (_, service):
        assert service.message_limiter is None and service.judgment_limiter.limit == DEFAULT_VOTES_PER_MINUTE
