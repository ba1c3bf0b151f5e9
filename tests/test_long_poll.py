"""Long polls: a held empty answer ends when its bell rings (a ring just before the wait is not
missed), or after its hold; a full server or a request it may not hold answers at once; the
SuperLink holds node pulls until the ServerApp pushes, the ServerApp's reply pulls until a node
pushes, the SuperExec's asks until a run starts; the node holds its SuperExec's ask for a task
only while the SuperExec can take one, until a message's task is stored; a poller that was held
asks again without sleeping (node loops and the server's reply loop)."""

import threading
import time
from types import SimpleNamespace

import pytest
from fakes import FakeGrid
from flwr.app import Message, RecordDict

from launch import superlink, supernode
from launch.long_poll import HELD_ABOVE, Bell, held, hold_option
from launch.polling import PollingTime
from server_app import loop
from server_app.waits import Poll

LONG = 60.0  # a hold no passing test waits out
READY = SimpleNamespace(supported_task_types=["flwr-serverapp"], agentapp_fab_hashes=[])  # a SuperExec's ask


def in_thread(call):
    """Run ``call`` in a thread; returns (thread, result dict with 'value' and 'seconds')."""
    result: dict = {}

    def run() -> None:
        start = time.monotonic()
        result["value"] = call()
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.001)


class Queue:
    """A handler over a list: answers its head, or ``[]`` when empty; counts its calls."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.calls = 0

    def __call__(self, *_, **__) -> list[str]:
        self.calls += 1
        return self.items[:1]


def test_a_held_empty_answer_ends_when_the_bell_rings_with_what_arrived():
    queue, bell = Queue(), Bell()
    holding = held(queue, bell, LONG, lambda answer: not answer, threading.BoundedSemaphore(1))
    thread, result = in_thread(holding)
    until(lambda: queue.calls == 1)  # looked, found nothing, waits
    queue.items.append("message")
    bell.ring()
    thread.join(LONG)
    assert result["value"] == ["message"] and result["seconds"] < LONG / 2


def test_a_held_empty_answer_is_returned_after_its_hold_when_nothing_rings():
    queue = Queue()
    holding = held(queue, Bell(), 0.05, lambda answer: not answer, threading.BoundedSemaphore(1))
    start = time.monotonic()
    assert holding() == [] and time.monotonic() - start >= 0.05


def test_an_arrival_between_the_look_up_and_the_wait_is_not_missed():
    bell = Bell()

    def arrives_during_the_first_look_up() -> list[str]:
        if not bell.count():
            bell.ring()  # the message is stored and rings after the look-up found nothing
            return []
        return ["message"]

    slots = threading.BoundedSemaphore(1)
    holding = held(arrives_during_the_first_look_up, bell, LONG, lambda answer: not answer, slots)
    start = time.monotonic()
    assert holding() == ["message"] and time.monotonic() - start < LONG / 2


def test_a_full_server_and_a_request_it_may_not_hold_answer_at_once():
    queue, slots = Queue(), threading.BoundedSemaphore(1)
    slots.acquire()  # every slot taken by other held requests
    start = time.monotonic()
    assert held(queue, Bell(), LONG, lambda a: not a, slots)() == []
    slots.release()
    assert held(queue, Bell(), LONG, lambda a: not a, slots, may_hold=lambda: False)() == []
    assert time.monotonic() - start < LONG / 2 and queue.calls == 2


def test_the_hold_option_defaults_and_refuses_holds_pollers_would_not_see_or_would_time_out_on():
    assert hold_option(None) == 1.0 and hold_option(0.0) == 0.0 and hold_option(5.0) == 5.0
    for nonsense in (-1.0, 0.2, 30.0):  # negative; shorter than a poller sees as held; past a timeout
        with pytest.raises(SystemExit, match=r"0 or within \[0.5, 5\]"):
            hold_option(nonsense)


class Answer(SimpleNamespace):
    """A protobuf-like answer: a repeated field ``messages_list``, or a message field ``task``."""

    def HasField(self, name: str) -> bool:
        return getattr(self, name) is not None


def fake_superlink() -> tuple[SimpleNamespace, SimpleNamespace, SimpleNamespace, dict[str, list]]:
    stored: dict[str, list] = {"messages": [], "replies": [], "runs": []}
    fleet = SimpleNamespace(
        pull_messages=lambda **_: Answer(messages_list=stored["messages"][:1]),
        push_messages=lambda **_: stored["replies"].append("reply"),
    )
    runtime = SimpleNamespace(
        pull_messages=lambda *_: Answer(messages_list=stored["replies"][:1]),
        push_messages=lambda *_: stored["messages"].append("message"),
        acquire_task=lambda *_: Answer(task=(stored["runs"] or [None])[0]),
    )
    control = SimpleNamespace(start_run=lambda *_: stored["runs"].append("run"), stop_run=lambda *_: None)
    return fleet, runtime, control, stored


@pytest.mark.parametrize(
    ("pull", "push"),
    [
        (lambda f, r, c: f.pull_messages(request=None), lambda f, r, c: r.push_messages(None)),
        (lambda f, r, c: r.pull_messages(None), lambda f, r, c: f.push_messages(request=None)),
        (lambda f, r, c: r.acquire_task(READY), lambda f, r, c: c.start_run(None)),
    ],
    ids=["a node's pull until the ServerApp pushes", "the ServerApp's pull until a node replies",
         "the SuperExec's ask until a run starts"],
)  # fmt: skip
def test_the_superlink_holds_each_empty_pull_until_what_it_waits_for_is_pushed(pull, push):
    fleet, runtime, control, _ = fake_superlink()
    superlink.patch(fleet, runtime, control, hold=LONG)
    thread, result = in_thread(lambda: pull(fleet, runtime, control))
    time.sleep(0.05)  # the pull is (most likely) held by now; either way it must see the push
    assert thread.is_alive()
    push(fleet, runtime, control)
    thread.join(LONG)
    assert result["seconds"] < LONG / 2
    answer = result["value"]
    assert answer.HasField("task") if hasattr(answer, "task") else answer.messages_list


def test_a_superlink_told_not_to_hold_is_flowers():
    modules = fake_superlink()[:3]
    before = [dict(vars(module)) for module in modules]
    superlink.patch(*modules, hold=0.0)
    assert [dict(vars(module)) for module in modules] == before  # not one handler replaced


def test_the_superlink_answers_a_superexec_at_capacity_at_once():
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    fleet, runtime, control, _ = fake_superlink()
    superlink.patch(fleet, runtime, control, hold=LONG)
    start = time.monotonic()
    assert not runtime.acquire_task(AcquireTaskRequest()).HasField("task")  # asks for no kind of task
    assert time.monotonic() - start < LONG / 2


def test_the_node_holds_a_ready_superexecs_ask_for_a_task_until_one_is_stored_but_not_a_busy_ones():
    import flwr.supernode.servicer.runtime.runtime_handlers as flower_handlers
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate import NodeStateFactory

    runtime = SimpleNamespace(acquire_task=flower_handlers.acquire_task)
    bell = supernode.hold_task_polls(runtime, LONG)
    state = NodeStateFactory(ObjectStoreFactory()).state()
    busy = AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP])  # no ClientApp capacity
    start = time.monotonic()
    assert not runtime.acquire_task(busy, state).HasField("task")
    assert time.monotonic() - start < LONG / 2  # answered at once: it could not take the task anyway
    ready = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    thread, result = in_thread(lambda: runtime.acquire_task(ready, state))
    time.sleep(0.05)
    assert thread.is_alive()
    state.create_task(task_type=TaskType.CLIENT_APP, run_id=1, fab_hash="fab")
    bell.ring()  # what the patched SuperNode loop does once a pulled message's task is stored
    thread.join(LONG)
    assert result["value"].HasField("task") and result["seconds"] < LONG / 2


def test_the_supernode_loop_rings_the_task_bell_when_a_message_arrives():
    bell = Bell()
    module = SimpleNamespace(
        time=time, _pull_and_store_message=iter([None, 7]).__next__, _push_messages=lambda: None,
        pull_objects=lambda *_, **__: None,
    )  # fmt: skip
    supernode.patch(module, cap=0.5, tasks=bell)
    module._pull_and_store_message()
    assert bell.count() == 0  # nothing pulled
    module._pull_and_store_message()
    assert bell.count() == 1


def test_a_node_loop_asks_again_at_once_after_a_held_poll(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    stand_in = PollingTime(Poll(0.01, 0.5), idle_above=1.0, short=0.02)
    stand_in.sleep(3)  # an ordinary empty poll: the poll's wait
    stand_in.awake_since -= HELD_ABOVE  # the next pass took as long as a held poll
    stand_in.sleep(3)
    stand_in.sleep(3)  # a quick pass again: waits
    assert sleeps == pytest.approx([0.01, 0.015])


def test_the_server_loop_asks_again_at_once_after_a_held_pull(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    pulls = 0

    class HoldingGrid(FakeGrid):
        def pull_messages(self, message_ids):
            nonlocal pulls
            pulls += 1
            clock[0] += HELD_ABOVE  # each pull held by the SuperLink
            return super().pull_messages(message_ids if pulls >= 3 else [])

    loop.REPLY_POLLS.clear()
    grid = HoldingGrid([1], lambda message: RecordDict())
    replies = loop.exchange(grid, [Message(RecordDict(), dst_node_id=1, message_type="query")], timeout=60.0)
    assert len(replies) == 1 and pulls == 3 and sleeps == []
