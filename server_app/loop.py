"""The federated round loop: train, aggregate, evaluate on the server, record."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, Error, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from experiment_schema import ExperimentConfig, experiment_hash
from finetune.memory import peak_rss_mb, reset_peak_rss
from finetune.privacy import epsilon
from finetune.records import from_record, to_record
from finetune.schedule import round_lr
from finetune.wire import WireFormatError, unpack
from server_app.checkpoint import Checkpoint, write_checkpoint
from server_app.results import RoundRecord, RunRecorder
from server_app.waits import HELD_ABOVE, Poll
from strategies import protocol
from strategies.engine import Engine
from strategies.protocol import Instruction

log = logging.getLogger(__name__)


class CommunicationBudgetExhausted(Exception):
    """The next round would take the run past ``federation.max_communication_mb``."""


Evaluate = Callable[[int, ArrayRecord], dict[str, float]]  # (server round, global arrays)
# Grid.send_and_receive polls every 3 s, which would idle whole rounds. Here at most every
# POLL_SECONDS, and often once the last reply is due — as long after the push as the shortest of the
# last exchanges of that message type took (server_app/waits.py); with no history, and after each
# reply, from FIRST_POLL_SECONDS up by POLL_GROWTH per empty poll. A SuperLink that holds an empty
# pull (launch/superlink.py) is asked again at once.
FIRST_POLL_SECONDS, POLL_GROWTH, POLL_SECONDS = 0.01, 1.5, 0.2
REPLY_POLLS: dict[str, Poll] = {}  # message type -> its exchanges' poll


def reply_poll(message_type: str) -> Poll:
    if message_type not in REPLY_POLLS:
        REPLY_POLLS[message_type] = Poll(FIRST_POLL_SECONDS, POLL_SECONDS, POLL_GROWTH)
    return REPLY_POLLS[message_type]


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    progress: Progress | None = None,
    on_reply: Callable[[Message], None] | None = None,
) -> list[Message]:
    """Push messages and pull their replies until all arrived or ``timeout`` seconds passed;
    ``progress(replied, sent, seconds)`` is called as replies arrive (it decides when to print).
    With ``on_reply`` every reply is handed over as it arrives instead of being returned. Every
    reply's arrays arrive packed and are unpacked here (``finetune.wire``); a reply packed another
    way becomes an error reply that names the two formats."""
    messages = list(messages)
    poll = reply_poll(messages[0].metadata.message_type if messages else "")
    pending = {message_id for message_id in grid.push_messages(messages) if message_id}
    poll.start()
    sent, start, received = len(pending), time.monotonic(), 0
    deadline = start + timeout
    replies: list[Message] = []
    while pending:
        asked = time.monotonic()
        arrived = list(grid.pull_messages(pending))
        held = time.monotonic() - asked >= HELD_ABOVE  # the SuperLink held the pull: ask again at once
        received += len(arrived)
        if arrived:
            poll.sooner()
        pending -= {reply.metadata.reply_to_message_id for reply in arrived}
        for packed in arrived:
            reply = unpacked(packed)
            if on_reply is not None:
                on_reply(reply)
            else:
                replies.append(reply)
        del arrived
        if progress is not None:
            progress(received, sent, time.monotonic() - start)
        if not pending:
            poll.arrived()
            break
        if time.monotonic() >= deadline:
            break
        if not held:
            time.sleep(poll.next_wait())
    return replies


def unpacked(reply: Message) -> Message:
    """``reply`` with its arrays unpacked in place; an error reply when they are in another format."""
    if reply.has_error() or protocol.ARRAYS not in reply.content.array_records:
        return reply
    try:
        reply.content.array_records[protocol.ARRAYS] = unpack(reply.content.array_records[protocol.ARRAYS])
    except WireFormatError as error:
        reply.__dict__["_content"] = None  # the reply becomes the error it is (Flower's own fields)
        reply.error = Error(code=0, reason=f"WireFormatError: {error}")
    return reply


Progress = Callable[[int, int, float], None]


def round_progress(server_round: int, every_seconds: float) -> Progress | None:
    """A progress line (clients replied / sampled, elapsed) at most every ``every_seconds``."""
    if every_seconds <= 0:
        return None
    printed = 0.0

    def report(replied: int, sent: int, seconds: float) -> None:
        nonlocal printed
        if seconds - printed >= every_seconds and replied < sent:
            log.info("round %d: %d/%d clients replied, %.0f s", server_round, replied, sent, seconds)
            printed = seconds

    return report


def run_federation(
    grid: Grid,
    strategy: Engine,
    cfg: ExperimentConfig,
    initial: ArrayRecord,
    evaluate: Evaluate,
    recorder: RunRecorder,
    central_dp: Strategy | None = None,
    resume: Checkpoint | None = None,
) -> ArrayRecord:
    """Run ``cfg.federation.num_rounds`` rounds (those after ``resume``'s round, when resuming)
    and return the final global arrays; a checkpoint follows every ``checkpoint.every`` rounds.

    ``central_dp`` (Flower's server-side fixed-clipping wrapper around ``strategy``) moves the
    messages instead when central DP is on; its ε is composed here, one release per aggregate."""
    releases: list[tuple[float, float, int]] = []
    if resume is None:
        arrays = start_federation(grid, strategy, cfg, initial, evaluate, recorder)
        first = 1
    else:
        arrays = to_record(resume.arrays)
        strategy.restore_state(resume.strategy_arrays, resume.strategy_state)
        releases = list(resume.releases)
        first = resume.round + 1
        log.info("resuming after round %d of %d", resume.round, cfg.federation.num_rounds)
    for server_round in range(first, cfg.federation.num_rounds + 1):
        round_start = time.perf_counter()
        lr = round_lr(cfg.train, server_round, cfg.federation.num_rounds, peak=cfg.peak_lr)
        reset_peak_rss()
        budget = budget_left(cfg, recorder)
        try:
            arrays, train = train_round(
                grid, strategy, cfg, arrays, server_round, lr, central_dp, releases, budget
            )
        except CommunicationBudgetExhausted as stop:
            log.warning("%s", stop)
            recorder.stopped = str(stop)
            break
        train_end, server_peak = time.perf_counter(), peak_rss_mb()
        eval_metrics = evaluate(server_round, arrays) if cfg.evaluation_due(server_round) else {}
        record = round_record(strategy, server_round, eval_metrics, train, lr)
        record.server_peak_rss_mb = round(server_peak, 1)
        record.train_phase_seconds = train_end - round_start
        record.eval_seconds = time.perf_counter() - train_end
        record.seconds = time.perf_counter() - round_start
        if checkpoint_due(cfg, server_round):
            size, seconds = save_checkpoint(cfg, strategy, recorder, arrays, releases, record)
            record.checkpoint_mb, record.checkpoint_seconds = round(size / 1e6, 3), round(seconds, 3)
        recorder.log_round(record)
    return arrays


def budget_left(cfg: ExperimentConfig, recorder: RunRecorder) -> float | None:
    """Bytes of ``federation.max_communication_mb`` not yet spent by the recorded rounds."""
    if not cfg.federation.max_communication_mb:
        return None
    spent = sum(
        int(row.get("payload_bytes_down") or 0) + int(row.get("payload_bytes_up") or 0)
        for row in recorder.rows
    )
    return cfg.federation.max_communication_mb * 1e6 - spent


def start_federation(
    grid: Grid,
    strategy: Engine,
    cfg: ExperimentConfig,
    initial: ArrayRecord,
    evaluate: Evaluate,
    recorder: RunRecorder,
) -> ArrayRecord:
    """Round 0: the initial model's evaluation and a rule's one-off exchange with the nodes."""
    start = time.perf_counter()
    initial_metrics = evaluate(0, initial)
    eval_seconds = time.perf_counter() - start
    arrays = strategy.setup(grid, initial, Instruction(cfg.to_json()).to_config())
    down, up = strategy.setup_bytes
    recorder.log_round(
        RoundRecord(
            0,
            initial_metrics,
            bytes_down=down,
            bytes_up=up,
            eval_seconds=eval_seconds,
            seconds=time.perf_counter() - start,
        )
    )
    return arrays


def checkpoint_due(cfg: ExperimentConfig, server_round: int) -> bool:
    every = cfg.checkpoint
    return every.enabled and (server_round % every.every == 0 or server_round == cfg.federation.num_rounds)


def save_checkpoint(
    cfg: ExperimentConfig,
    strategy: Engine,
    recorder: RunRecorder,
    arrays: ArrayRecord,
    releases: list[tuple[float, float, int]],
    record: RoundRecord,
) -> tuple[int, float]:
    """The run after ``record``'s round, atomically in ``<run folder>/checkpoints/``; (bytes, s)."""
    strategy_arrays, strategy_state = strategy.checkpoint_state()
    checkpoint = Checkpoint(
        round=record.round,
        arrays=from_record(arrays),
        config=cfg.to_dict(),
        config_hash=experiment_hash(cfg),
        strategy_arrays=strategy_arrays,
        strategy_state=strategy_state,
        releases=releases,
        rows=[*recorder.rows, record.to_row()],
    )
    return write_checkpoint(recorder.folder, checkpoint, cfg.checkpoint.keep)


def train_round(
    grid: Grid,
    strategy: Engine,
    cfg: ExperimentConfig,
    arrays: ArrayRecord,
    server_round: int,
    lr: float,
    central_dp: Strategy | None,
    releases: list[tuple[float, float, int]],
    budget: float | None = None,
) -> tuple[ArrayRecord, dict[str, float]]:
    """Send the round's instructions, aggregate the replies; the new global arrays (the old ones
    when the round kept them) and the aggregated reply metrics. ``budget``: the bytes the run may
    still move; a round that would move more is not sent (:class:`CommunicationBudgetExhausted`)."""
    driver = central_dp or strategy
    config = Instruction(cfg.to_json(), server_round=server_round, lr=lr).to_config()
    messages = list(driver.configure_train(server_round, arrays, config, grid))
    planned = strategy.planned_bytes(server_round) if budget is not None else 0
    if budget is not None and planned > budget:
        raise CommunicationBudgetExhausted(
            f"communication budget: round {server_round} would move {planned / 1e6:,.1f} MB with "
            f"{max(budget, 0) / 1e6:,.1f} MB of federation.max_communication_mb="
            f"{cfg.federation.max_communication_mb:g} left; the run stops after round {server_round - 1}"
        )
    progress = round_progress(server_round, cfg.logging.progress_seconds)
    streaming = central_dp is None and strategy.start_streaming(
        server_round, cfg.federation.stream_aggregation
    )
    on_reply = strategy.receive if streaming else None
    replies = exchange(grid, messages, cfg.federation.round_timeout_s, progress, on_reply)
    new_arrays, train_metrics = driver.aggregate_train(server_round, replies)
    train = {k: float(v) for k, v in (train_metrics or {}).items() if isinstance(v, int | float)}
    if new_arrays is not None:
        arrays = new_arrays
        if central_dp is not None:
            q = len(messages) / max(len(list(grid.get_node_ids())), 1)
            releases.append((cfg.privacy.noise_multiplier, q, 1))
    if central_dp is not None:
        train[protocol.DP_EPSILON] = epsilon(releases, cfg.privacy.target_delta, cfg.privacy.accountant)
    return arrays, train


def round_record(
    strategy: Engine,
    server_round: int,
    eval_metrics: dict[str, float],
    train: dict[str, float],
    lr: float,
) -> RoundRecord:
    """What the round moved, who took part, and the clients' aggregated metrics."""
    stats = strategy.rounds[server_round]

    def optional_int(key: str) -> int | None:
        return int(train[key]) if key in train else None

    return RoundRecord(
        server_round,
        eval_metrics,
        train_loss=train.get(protocol.TRAIN_LOSS),
        lr=lr,
        bytes_down=sum(stats.bytes_down.values()),
        bytes_up=sum(stats.bytes_up.values()),
        bytes_down_per_client={str(k): v for k, v in stats.bytes_down.items()},
        bytes_up_per_client={str(k): v for k, v in stats.bytes_up.items()},
        payload_bytes_down=sum(stats.payload_down.values()),
        payload_bytes_up=sum(stats.payload_up.values()),
        clients_sampled=len(stats.sampled),
        clients_aggregated=len(stats.aggregated),
        partitions_aggregated=[strategy.node_partitions.get(n) for n in stats.aggregated],
        clients_rejected={str(k): v for k, v in stats.rejected.items()},
        update_norms={str(k): v for k, v in stats.update_norms.items()},
        updates_clipped={str(k): v for k, v in stats.clipped.items()},
        replies_ignored=list(stats.ignored),
        kept_previous=stats.kept_previous,
        slowest_client_seconds=train.get(protocol.TRAIN_SECONDS),
        client_seconds_total=sum(stats.client_seconds.values()),
        client_seconds=[stats.client_seconds[n] for n in sorted(stats.client_seconds)],
        client_handler_seconds=[stats.handler_seconds[n] for n in sorted(stats.handler_seconds)],
        slowest_startup_seconds=train.get(protocol.STARTUP_SECONDS),
        slowest_setup_seconds=train.get(protocol.SETUP_SECONDS),
        slowest_data_seconds=train.get(protocol.DATA_SECONDS),
        peak_client_memory_mb=train.get(protocol.PEAK_MEMORY_MB),
        examples_seen=optional_int(protocol.EXAMPLES_SEEN),
        optimizer_state_bytes=optional_int(protocol.OPTIMIZER_STATE_BYTES),
        dp_epsilon=train.get(protocol.DP_EPSILON),
    )


def evaluate_on_clients(
    grid: Grid, strategy: Engine, cfg: ExperimentConfig, server_round: int, arrays: ArrayRecord
) -> dict[str, float]:
    """Personalised evaluation: every client evaluates its own model on its own data."""
    config = Instruction(cfg.to_json(), server_round=server_round).to_config()
    messages = list(strategy.configure_evaluate(server_round, arrays, config, grid))
    metrics = strategy.aggregate_evaluate(
        server_round, exchange(grid, messages, cfg.federation.round_timeout_s)
    )
    if metrics is None:
        raise RuntimeError(f"round {server_round}: no client returned evaluation metrics")
    return {
        k: float(v) for k, v in metrics.items() if k != protocol.NUM_EXAMPLES and isinstance(v, int | float)
    }
