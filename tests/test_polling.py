"""The deployed runtime's waits: a poll waits at most its cap at a time, learns when the next
arrival is due from the last quiet spell and polls from its floor from then on; the SuperNode's and
the SuperExec's idle sleeps follow such a poll, short in-process waits are capped; missing message
objects are asked for again within milliseconds (SuperNode, warm worker, ServerApp); the server
loop polls for replies the same way; the launcher asks for a run's status when its log stream
ends, not on a timer."""

import functools
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fakes import FakeGrid
from flwr.app import Message, RecordDict

from launch import simulation, supernode
from launch.cluster import LocalCluster
from launch.polling import PollingTime
from server_app import loop
from server_app.waits import OBJECT_RETRY, Poll, retry_missing_objects_sooner


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_without_history_a_poll_starts_at_its_floor_grows_to_its_cap_and_sooner_returns_it():
    poll = Poll(0.01, 0.05, growth=2.0, clock=Clock())
    assert [poll.next_wait() for _ in range(5)] == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05])
    poll.sooner()
    assert poll.next_wait() == pytest.approx(0.01)


def test_a_poll_waits_at_its_cap_until_the_next_arrival_is_due_then_polls_from_its_floor():
    clock = Clock()
    poll = Poll(0.01, 0.5, growth=2.0, lead=0.9, precision=0.02, clock=clock)
    poll.start()
    clock.now += 2.9
    poll.next_wait()  # an empty poll at 2.9 s
    clock.now += 0.2
    poll.arrived()  # came between 2.9 and 3.1 s: the spell counts as 3 s
    poll.start()  # the next one begins: due after 0.9 * 3 = 2.7 s
    waits = []
    for _ in range(10):
        waits.append(poll.next_wait())
        clock.now += waits[-1]
    assert waits[:5] == pytest.approx([0.5] * 5) and waits[5] == pytest.approx(0.2)  # up to the due time
    assert waits[6:10] == pytest.approx([0.06] * 4)  # due: every 2 % of the expected spell
    clock.now += 1.0  # running late: at most a fifth of the lateness so far
    assert poll.next_wait() == pytest.approx(0.2 * (1.0 + 4 * 0.06))
    clock.now += 10.0  # nothing came for long past the due time: back at the cap
    assert [poll.next_wait() for _ in range(3)] == pytest.approx([0.5] * 3)


def test_the_next_spell_is_expected_to_last_as_long_as_the_shortest_of_the_last_three():
    clock = Clock()
    poll = Poll(0.01, 0.5, lead=0.5, clock=clock)
    for spell in (1.0, 3.0, 2.0, 4.0):  # 1 s falls out of the last three
        poll.start()
        clock.now += spell
        poll.next_wait()  # an empty poll just before it came
        poll.arrived()
    poll.start()
    clock.now += 0.9  # due at 0.5 * 2 s
    assert poll.next_wait() == pytest.approx(0.1)
    clock.now += 0.1
    assert poll.next_wait() == pytest.approx(0.02 * 2.0)


@pytest.mark.parametrize(
    ("floor", "cap", "growth", "lead"),
    [(0.0, 1.0, 1.5, 0.9), (0.5, 0.1, 1.5, 0.9), (0.1, 1.0, 0.5, 0.9), (0.1, 1.0, 1.5, 2.0)],
)
def test_a_poll_refuses_bounds_that_cannot_work(floor, cap, growth, lead):
    with pytest.raises(ValueError, match=r"floor|shrink|fractions"):
        Poll(floor, cap, growth, lead)


def recorded_sleeps(monkeypatch) -> list[float]:
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    return sleeps


def test_idle_sleeps_follow_the_poll_and_short_waits_are_capped(monkeypatch):
    sleeps = recorded_sleeps(monkeypatch)
    stand_in = PollingTime(Poll(0.01, 0.5, growth=2.0, clock=Clock()), idle_above=1.0, short=0.02)
    for seconds in (3, 3, 0.5, 3, 0.005):  # Flower's idle sleep (3 s), reply check (0.5 s), other
        stand_in.sleep(seconds)
    assert sleeps == pytest.approx([0.01, 0.02, 0.02, 0.04, 0.005])
    assert stand_in.monotonic is time.monotonic  # the rest of the time module is the real one


def fake_node_loop(pulls: list[int | None]) -> SimpleNamespace:
    """What ``launch.supernode.patch`` replaces in Flower's SuperNode loop, with recorded calls."""
    calls: list[dict] = []
    return SimpleNamespace(
        time=time,
        _pull_and_store_message=lambda **_: pulls.pop(0),
        _push_messages=lambda **_: None,
        pull_objects=lambda object_ids, **kwargs: calls.append(kwargs),
        calls=calls,
    )


def test_the_supernode_learns_when_its_next_message_is_due_from_its_reply_to_the_next_message(monkeypatch):
    sleeps = recorded_sleeps(monkeypatch)
    module = fake_node_loop([None, None, 7, 7])
    poll = supernode.patch(module, cap=0.5)
    for _ in range(2):  # nothing waiting: Flower's loop sleeps 3 s each time
        assert module._pull_and_store_message() is None
        module.time.sleep(3)
    assert sleeps == pytest.approx([0.01, 0.015])  # no history: from the floor up
    assert not poll.spells
    assert module._pull_and_store_message() == 7  # a message (its run id) arrived ...
    assert not poll.spells  # ... after the node's start-up, which says nothing of the next spell
    module._push_messages()  # the reply went out: a spell begins, polled from the floor
    assert poll.current == pytest.approx(0.01) and poll.cap == 0.5
    module.time.sleep(0.5)  # waiting for the ClientApp's reply: an in-process look-up every 20 ms
    assert sleeps[-1] == pytest.approx(supernode.REPLY_CHECK)
    module.time.sleep(3)
    assert module._pull_and_store_message() == 7  # the next message: the spell it ended is recorded
    assert len(poll.spells) == 1
    module.pull_objects(["id"])
    assert module.calls == [{"initial_backoff": OBJECT_RETRY[0], "backoff_cap": OBJECT_RETRY[1]}]


def test_the_idle_poll_option_sets_the_cap_and_refuses_nonsense():
    assert supernode.idle_poll(["--idle-poll", "0.2", "--insecure"]) == (0.2, ["--insecure"])
    assert supernode.idle_poll(["--idle-poll=3"]) == (3.0, [])
    assert supernode.idle_poll([]) == (supernode.DEFAULT_IDLE_POLL, [])
    with pytest.raises(SystemExit, match="must be > 0"):
        supernode.idle_poll(["--idle-poll", "0"])


def test_the_heartbeat_option_sets_what_the_node_declares_and_refuses_what_the_superlink_would(monkeypatch):
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection
    from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL

    assert supernode.HEARTBEAT_RANGE == (HEARTBEAT_MIN_INTERVAL, HEARTBEAT_MAX_INTERVAL)
    assert supernode.heartbeat_interval(["--insecure", "--heartbeat-interval=12"]) == (12.0, ["--insecure"])
    assert supernode.heartbeat_interval(["--insecure"]) == (None, ["--insecure"])
    with pytest.raises(SystemExit, match=r"within \[10, 1800\] seconds, got 5"):
        supernode.heartbeat_interval(["--heartbeat-interval", "5"])
    with pytest.raises(SystemExit, match="takes seconds"):
        supernode.heartbeat_interval(["--heartbeat-interval", "soon"])
    with pytest.raises(ValueError, match="within"):
        LocalCluster(Path("unused"), 2, heartbeat_interval=3)
    with pytest.raises(ValueError, match="warm runtime"):
        LocalCluster(Path("unused"), 2, heartbeat_interval=10, warm=False)
    monkeypatch.setattr(connection, "HEARTBEAT_DEFAULT_INTERVAL", connection.HEARTBEAT_DEFAULT_INTERVAL)
    monkeypatch.setattr(heartbeat, "HEARTBEAT_DEFAULT_INTERVAL", heartbeat.HEARTBEAT_DEFAULT_INTERVAL)
    supernode.set_heartbeat_interval(10.0)
    assert connection.HEARTBEAT_DEFAULT_INTERVAL == heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 10.0


def test_the_server_grid_asks_for_missing_reply_objects_within_milliseconds():
    from flwr.superlink.grid import http_grid

    flower_pull = http_grid.pull_objects
    if isinstance(flower_pull, functools.partial):  # a ServerApp in this process already did it
        flower_pull = http_grid.pull_objects = flower_pull.func
    try:
        retry_missing_objects_sooner()
        retry_missing_objects_sooner()  # once per process, however often it is called
        patched = http_grid.pull_objects
        assert isinstance(patched, functools.partial) and patched.func is flower_pull
        assert patched.keywords == {"initial_backoff": OBJECT_RETRY[0], "backoff_cap": OBJECT_RETRY[1]}
    finally:
        http_grid.pull_objects = flower_pull


def test_the_server_loop_polls_for_replies_from_its_floor_and_again_after_each_reply(monkeypatch):
    sleeps = recorded_sleeps(monkeypatch)
    arrives_at_poll = {1: 3, 2: 5}  # node -> the poll at which its reply is there
    polls = 0

    class SlowGrid(FakeGrid):
        def pull_messages(self, message_ids):
            nonlocal polls
            polls += 1
            due = [
                i for i in message_ids
                if i in self._replies and polls >= arrives_at_poll[self._replies[i].metadata.src_node_id]
            ]  # fmt: skip
            return super().pull_messages(due)

    loop.REPLY_POLLS.clear()  # no history of earlier exchanges
    grid = SlowGrid([1, 2], lambda message: RecordDict())
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in (1, 2)]
    replies = loop.exchange(grid, messages, timeout=60.0)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    first, growth = loop.FIRST_POLL_SECONDS, loop.POLL_GROWTH
    assert sleeps == pytest.approx([first, first * growth, first, first * growth])


class FakeLogStream:
    """``flwr log --stream``: running until ``wait`` is called, then ended."""

    def __init__(self) -> None:
        self.ended = False
        self.waited: list[float] = []

    def poll(self):
        return 0 if self.ended else None

    def wait(self, timeout):
        self.waited.append(timeout)
        self.ended = True


def test_the_launcher_asks_for_the_status_when_the_log_stream_ends_not_on_a_timer(monkeypatch):
    sleeps = recorded_sleeps(monkeypatch)
    stream = FakeLogStream()
    simulation.wait_for_run(stream, remaining=600.0)
    assert stream.waited == [simulation.STATUS_SAFETY_POLL_S] and sleeps == []  # woken by the stream's end
    simulation.wait_for_run(stream, remaining=600.0)  # ended: poll every 2 s
    simulation.wait_for_run(None, remaining=1.0)  # no stream: poll, never past the time left
    assert sleeps == [simulation.STATUS_POLL_S, 1.0]


def test_the_superexec_wakes_when_its_worker_reports_instead_of_sleeping_out_its_poll(monkeypatch):
    import multiprocessing

    from launch.warm_node import WarmExecutor, WorkerSettings

    sleeps = recorded_sleeps(monkeypatch)
    executor = WarmExecutor(WorkerSettings(), Poll(0.01, 0.5, clock=Clock()))
    ours, theirs = multiprocessing.Pipe()
    executor.worker = SimpleNamespace(busy=True, connection=ours)
    theirs.send({"task_id": 1})  # the worker's report is already waiting
    start = time.monotonic()
    executor.idle(60.0)
    assert time.monotonic() - start < 30.0 and sleeps == []  # woken by the report, no sleep taken
    executor.worker = None
    executor.idle(0.25)  # no busy worker: an ordinary sleep
    assert sleeps == [0.25]
