"""The cluster link: this node's side of the Redis Streams that engines share.

- **Forwarding.** The forwarder actor runs ``ClusterLink.forward`` after each
  commit: committed outbox rows after the producer's high-water mark go, in
  ``seq`` order and in batches, through one Lua call that XADDs each to its
  partition's stream and moves the mark in Redis in the same atomic step, so
  an event is in the streams exactly once across crashes. The mark is where a
  restart resumes; a Redis that came back empty (the mark is lower than what
  this node forwarded, seen by the next forward or the next beat) is filled
  again from what the outbox still holds.
- **Leases.** Every ``lease_ttl / 3`` the node beats (a sorted set of nodes and
  their expiry), renews its leases (``SET NX PX`` keys holding a fencing
  token), gives up partitions above its share (``ceil(partitions / live
  nodes)``) and takes free ones below it.
- **Cluster scope.** For each leased partition a reader reads the consumer
  group's pending entries of that partition first, then new ones, hands each
  event to the subscription's actor for that partition, waits until it was
  handled or dead-lettered, and acknowledges it only if the lease is still
  its own (a fenced XACK).
- **Node scope.** A reader per partition follows the stream from a position
  kept in the node's database; a projection's position commits with its writes.
- **Retention.** The node with the smallest name trims each stream below what
  every group and every node-scope position passed, and to ``max_len``.
- **Idle.** ``engine.idle`` waits until what this node forwarded is read back by
  its readers: the highest seq of its own events per partition, forwarded and
  handled. A read that finds the stream's end covers what was in Redis before it
  began (trimmed entries, a Redis that lost data).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from functools import partial
from typing import Any, Final, TypeVar

import anyio
from anyio.abc import TaskStatus

from ._actor import current_cell
from ._breaker import CircuitBreaker, CircuitBreakerConfig
from ._bus import EventBus
from ._cache import closing_connection_class, is_redis_outage, redact
from ._deadletters import DeadLetter, DeadLetters
from ._durable import Outbox, project_event
from ._errors import EngineError
from ._events import Event, EventDecodeError, decode
from ._extras import MissingExtra, needs_redis
from ._routing import Delivery, Routes, Subscription, stable_hash
from ._runtime import Runtime
from ._store import OutboxRow, Request, Transaction, read_outbox
from ._system import Emit, PartitionsRebalanced, ignore
from .cluster import ClusterMetrics, RedisStreams

__all__ = ["FORWARDER", "ClusterLink", "breaker_config"]

logger = logging.getLogger("actorbus.cluster")

_T = TypeVar("_T")

FORWARDER: Final = "actorbus.cluster.forwarder"
FORWARD_BATCH: Final = 256
READ_COUNT: Final = 64
BLOCK_MS: Final = 200
RETRY_INITIAL: Final = 0.05
RETRY_MAX: Final = 1.0
MAX_BEAT: Final = 0.5
# How often a partition's reader looks at its pending entries again while busy.
PENDING_LOOK: Final = 1.0
# How long (in lease TTLs) a partition being handed on waits for the entry in hand.
HAND_OVER_WAIT: Final = 3
# How often the forwarder writes its position while it works through a backlog.
SAVE_EVERY: Final = 1.0
# What the error names when coredis is missing (``pip install 'actorbus[redis]'``).
FEATURE: Final = "cluster mode (cluster=RedisStreams(...))"

# Moves the producer's high-water mark and XADDs the events above it, atomically.
# KEYS: the marks hash, then the streams of this batch. ARGV: producer, the seq
# the caller believes is forwarded, then (seq, index of its stream in KEYS, payload,
# trace context or '')... An entry has fields p (producer), s (seq), e (the event)
# and, for an event published in a trace, t (its W3C context, engine._tracing).
_FORWARD = """
local mark = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if mark < tonumber(ARGV[2]) then
  return {-1, mark}
end
local top = mark
for i = 3, #ARGV, 4 do
  local seq = tonumber(ARGV[i])
  if seq > top then
    local key = KEYS[tonumber(ARGV[i + 1])]
    if ARGV[i + 3] == '' then
      redis.call('XADD', key, '*', 'p', ARGV[1], 's', ARGV[i], 'e', ARGV[i + 2])
    else
      redis.call('XADD', key, '*', 'p', ARGV[1], 's', ARGV[i], 'e', ARGV[i + 2],
        't', ARGV[i + 3])
    end
    top = seq
  end
end
if top > mark then
  redis.call('HSET', KEYS[1], ARGV[1], top)
end
return {top, mark}
"""
# The beat, on Redis' clock: this node's expiry in the set of live nodes and in the
# set of members of each of its cluster-scope subscriptions; returns now (ms) and
# the live members of each set. KEYS: the sets. ARGV: node, lease TTL (ms).
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now}
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  out[#out + 1] = redis.call('ZRANGE', KEYS[i], 0, -1)
end
return out
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_ACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
end
return -1
"""
# engine.forget of a cluster-scope subscription no live node runs: its members set
# and its consumer group in each partition's stream go, in one step with the check.
# KEYS: the members set, then the streams. ARGV: the group. Returns {groups
# destroyed, live members}; -1 and the members when a live node still runs it.
_FORGET_GROUPS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
if #live > 0 then
  return {-1, live}
end
redis.call('DEL', KEYS[1])
local destroyed = 0
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    destroyed = destroyed + redis.call('XGROUP', 'DESTROY', KEYS[i], ARGV[1])
  end
end
return {destroyed, live}
"""


def ANSWERS() -> tuple[type[Exception], ...]:
    """Errors that are Redis' answers, not outages: the breaker ignores them."""
    with needs_redis(FEATURE):
        from coredis.exceptions import ResponseError, StreamConsumerError

    return (ResponseError, StreamConsumerError)


def breaker_config() -> CircuitBreakerConfig:
    """The link's breaker: opens after 3 outages in a row, probes every second (so
    forwarding resumes soon after Redis answers again); Redis' answers do not count."""
    try:
        answers = ANSWERS()
    except MissingExtra:
        # The engine is built before it starts; without coredis ``connect`` refuses to
        # start the link, so no call ever goes through this breaker.
        answers = ()
    return CircuitBreakerConfig(failure_threshold=3, timeout=1.0, ignore=answers)


class Unavailable(EngineError):
    """Redis could not serve a cluster call (down, timing out, or its breaker open)."""


def parse_id(entry: bytes | str) -> tuple[int, int]:
    text = entry.decode() if isinstance(entry, bytes) else entry
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(position: tuple[int, int]) -> str:
    return f"{position[0]}-{position[1]}"


def _away_or_answered() -> tuple[type[Exception], ...]:
    """Redis away (``Unavailable``) or answering no: how a call that did not go through ends."""
    return (Unavailable, *ANSWERS())


def _next_id(position: tuple[int, int]) -> str:
    return f"{position[0]}-{position[1] + 1}"


class _Seqs:
    """The highest seq of this node's own events per partition (``engine.idle``): the
    ones forwarded to Redis, or the ones one subscription's readers read back."""

    __slots__ = ("seqs",)

    def __init__(self) -> None:
        self.seqs: dict[int, int] = {}

    def mark(self, partition: int, seq: int) -> None:
        if seq > self.seqs.get(partition, 0):
            self.seqs[partition] = seq

    def of(self, partition: int) -> int:
        return self.seqs.get(partition, 0)


class _Lease:
    """A partition this node holds: the fencing token and until when it is surely ours."""

    __slots__ = (
        "ended",
        "held",
        "key",
        "partition",
        "read_back",
        "scope",
        "token",
        "valid_until",
    )

    def __init__(
        self, key: str, partition: int, token: str, valid_until: float, read_back: _Seqs
    ) -> None:
        self.key = key
        self.read_back = read_back
        self.partition = partition
        self.token = token
        self.valid_until = valid_until
        self.held = True
        self.scope: anyio.CancelScope | None = None
        # Set when its reader stopped (the entry in hand finished and acknowledged).
        self.ended = anyio.Event()

    def valid(self) -> bool:
        return self.held and anyio.current_time() < self.valid_until


def entry_origin(entry: Any) -> tuple[str, int]:
    """The producer and outbox seq a stream entry carries (fields ``p`` and ``s``);
    seq 0 when it has none that parses (an entry another tool wrote)."""
    fields = entry.field_values
    producer = bytes(fields.get(b"p", b"")).decode("utf-8", "replace")
    try:
        seq = int(fields.get(b"s", b"0"))
    except ValueError:
        seq = 0
    return producer, seq


def entry_trace(entry: Any) -> str | None:
    """The trace context a stream entry carries (field ``t``), if any (engine._tracing)."""
    raw = entry.field_values.get(b"t")
    return raw.decode("ascii", "replace") if isinstance(raw, bytes) else None


class _Follower:
    """One node-scope reader of one partition: ``stop`` ends it after the entry in hand."""

    __slots__ = ("ended", "read_back", "scope", "stopped")

    def __init__(self, read_back: _Seqs) -> None:
        self.read_back = read_back
        self.ended = anyio.Event()
        self.scope: anyio.CancelScope | None = None
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        if self.scope is not None:
            self.scope.cancel()  # a read in progress; handling an entry is shielded


class _Reader:
    """Hands one entry at a time to a subscription's actor and waits for its outcome."""

    def __init__(self, link: ClusterLink, subscription: Subscription) -> None:
        self.link = link
        self.subscription = subscription
        self.finished = anyio.Event()
        self.routes = Routes(
            subscription.routes.router, link.dead_letters, self._done, link.runtime_closing
        )

    def _done(self) -> None:
        self.finished.set()

    async def handle(self, partition: int, cell_index: int | None, entry: Any) -> bool:
        """Handle one stream entry; True when it is finished (handled or dead-lettered),
        False when the engine cut it short (it comes again)."""
        link = self.link
        subscription = self.subscription
        entry_id = entry.identifier.decode()
        payload = entry.field_values.get(b"e", b"")
        try:
            event = decode(payload)
        except EventDecodeError as exc:
            await link.dead_letter(subscription.name, payload, exc, entry_id, entry_trace(entry))
            return True
        if not subscription.matches(type(event)):
            return True
        self.finished = anyio.Event()
        delivery = Delivery(event, self.routes, entry=entry_id, trace=entry_trace(entry))
        delivery.routed = True
        if cell_index is None:
            try:
                cell_index = subscription.index(event)
            except Exception as exc:
                subscription.refuse(delivery, "failed", exc)
                await self.finished.wait()
                return True
        await subscription.deliver_to(subscription.cells[cell_index], delivery)
        await self.finished.wait()
        return not delivery.cut_short


class ClusterLink:
    """This node in the cluster: forwarding, leases, readers, retention, metrics."""

    def __init__(
        self,
        config: RedisStreams,
        runtime: Runtime,
        bus: EventBus,
        outbox: Outbox,
        dead_letters: DeadLetters,
        breaker: CircuitBreaker,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.bus = bus
        self.outbox = outbox
        self.dead_letters = dead_letters
        self.breaker = breaker
        ns = config.namespace
        self._marks = f"{ns}:marks"
        self._nodes = f"{ns}:nodes"
        self._fence = f"{ns}:fence"
        self._meta = f"{ns}:partitions"
        self._positions = f"{ns}:positions"
        self.producer = ""
        self.forwarded = 0
        # Each change of the partitions this node holds goes out as a PartitionsRebalanced.
        self.emit: Emit = ignore
        self.connected = False
        self.live_nodes: list[str] = [config.node]
        self.trimmed = 0
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._client_done: anyio.Event | None = None
        # The scopes of the link's own tasks (the beat, the readers), and how many run.
        self._scopes: set[anyio.CancelScope] = set()
        self._running = 0
        self._all_stopped: anyio.Event | None = None
        self._grouped: set[str] = set()
        # Cluster-scope subscriptions this node balanced once (took the free partitions).
        self._balanced: set[str] = set()
        self._joined = anyio.Event()
        # Cluster-scope subscriptions: their leases by partition.
        self._leased: dict[str, dict[int, _Lease]] = {}
        # Leases being handed on: renewed until their reader finished the entry in hand.
        self._leaving: set[_Lease] = set()
        self._cluster_subscriptions: dict[str, Subscription] = {}
        # Node-scope readers by subscription: the scope of each, and its end.
        self._followers: dict[str, list[_Follower]] = {}
        self._lag: dict[str, dict[int, int]] = {}
        # Node-scope positions to checkpoint: (subscription, partition) -> entry id.
        self._positions_seen: dict[tuple[str, int], tuple[int, int]] = {}
        self._positions_saved: dict[tuple[str, int], tuple[int, int]] = {}
        # engine.idle: what this node forwarded in this run; per subscription, how far
        # its readers read that back (a record per subscription: one closed and made
        # again gets a new one, so late marks of its old readers land in the old).
        self._sent = _Seqs()
        self._read_back: dict[str, _Seqs] = {}

    def runtime_closing(self) -> bool:
        return self.runtime.closing

    @contextlib.contextmanager
    def _owned_scope(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope ``stop`` cancels, for one of the link's tasks (it waits for
        them before the client closes). Entered once ``stop`` began (a task that was
        still starting), it is cancelled at once: the client is closing."""
        with anyio.CancelScope() as scope:
            if self._all_stopped is not None:
                scope.cancel()
            self._scopes.add(scope)
            self._running += 1
            try:
                yield scope
            finally:
                self._scopes.discard(scope)
                self._running -= 1
                if not self._running and self._all_stopped is not None:
                    self._all_stopped.set()

    # ------------------------------------------------------------- life

    async def connect(self) -> None:
        """Connect (the client runs in a task of the engine), learn this database's
        producer id, and join the namespace; a namespace with another partition count
        refuses the node. A Redis that does not answer is joined later, in the background."""
        self.producer = await self.outbox.store.call(_producer_id, kind="cluster", background=True)
        runtime = self.runtime
        await runtime.task_group.start(self._run_client, name="actorbus cluster client")
        try:
            with anyio.fail_after(min(2.0, self.config.lease_ttl)):
                await self._join()
        except EngineError as exc:
            if not isinstance(exc, Unavailable):
                raise
            logger.warning("cluster: Redis does not answer yet (%s); joining when it does", exc)
        except TimeoutError:
            logger.warning("cluster: Redis does not answer yet; joining when it does")
        runtime.start_task(self._run, name="actorbus cluster")

    async def _run_client(self, *, task_status: TaskStatus[None]) -> None:
        with needs_redis(FEATURE):
            import coredis
            from coredis.exceptions import ConnectionError as RedisConnectionError
            from coredis.retry import ConstantRetryPolicy

        client = coredis.Redis.from_url(
            self.config.url,
            connect_timeout=1.0,
            stream_timeout=BLOCK_MS / 1000 + 5.0,
            retry_policy=ConstantRetryPolicy((RedisConnectionError,), retries=1, delay=0.0),
        )
        pool = client.connection_pool
        pool.connection_class = closing_connection_class(pool.connection_class)
        self._client_done = done = anyio.Event()
        async with client:
            self._client = client
            for name, text in (
                ("beat", _BEAT),
                ("forward", _FORWARD),
                ("renew", _RENEW),
                ("release", _RELEASE),
                ("ack", _ACK),
                ("forget", _FORGET_GROUPS),
            ):
                self._scripts[name] = client.register_script(text)
            task_status.started()
            with anyio.CancelScope(shield=True):
                await done.wait()
        self._client = None

    async def stop(self) -> None:
        """Leave: stop the readers (the entry in hand is finished first), give up every
        lease and the heartbeat at once, close the client."""
        leases = [lease for held in self._leased.values() for lease in held.values()]
        for lease in leases:
            lease.held = False
        self._all_stopped = stopped = anyio.Event()
        for scope in list(self._scopes):
            scope.cancel()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
            if self._running:
                await stopped.wait()
            try:
                for lease in leases:
                    await self._release(lease)
                for key in (self._nodes, *map(self._members, self._cluster_subscriptions)):
                    await self._redis("zrem", key, [self.config.node])
                await self._checkpoint_positions()
            except (Unavailable, TimeoutError) as exc:
                logger.info(
                    "cluster: could not leave cleanly (%s); leases expire by themselves", exc
                )
        if self._client_done is not None:
            self._client_done.set()

    async def _redis(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """The client's ``command(*args, **kwargs)`` under the link's breaker;
        ``Unavailable`` for any outage."""
        client = self._client
        if client is None:
            raise Unavailable("the cluster client is not running")
        return await self._call(getattr(client, command), *args, **kwargs)

    async def _script(self, name: str, keys: list[Any], args: list[Any]) -> Any:
        """One of the link's Lua scripts, under the breaker."""
        script = self._scripts.get(name)
        if script is None:
            raise Unavailable("the cluster client is not running")
        return await self._call(script, keys=keys, args=args)

    async def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        try:
            result = await self.breaker.call(fn, *args, **kwargs)
        except ANSWERS():
            self.connected = True
            raise  # Redis answered (a group exists already, no such key): not an outage
        except Exception as exc:
            self.connected = False
            if is_redis_outage(exc):
                raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
            raise
        self.connected = True
        return result

    async def _join(self) -> None:
        config = self.config
        with needs_redis(FEATURE):
            import coredis

        await self._redis("set", self._meta, config.partitions, condition=coredis.PureToken.NX)
        stored = await self._redis("get", self._meta)
        if stored is not None and int(stored) != config.partitions:
            raise EngineError(
                f"cluster namespace {config.namespace!r} on {redact(config.url)} has "
                f"{int(stored)} partitions; this node was started with {config.partitions} "
                "(the partition count of a namespace is fixed: changing it is a migration)"
            )
        forwarded = self.forwarded  # known to be in Redis before this read
        mark = await self._redis("hget", self._marks, self.producer)
        held = int(mark) if mark is not None else 0
        if self._joined.is_set():
            # Redis came back without this node's events: forward them again now (the
            # beat wakes the forwarder), not only once something new commits.
            if held < forwarded:
                self._lost(held)
            return
        self.forwarded = held
        if not self._joined.is_set():
            self._joined.set()
            logger.info(
                "cluster: node %r joined namespace %r (%d partitions), forwarding from seq %d",
                config.node,
                config.namespace,
                config.partitions,
                self.forwarded,
            )

    async def _run(self) -> None:
        """The node's beat: join, heartbeat, leases, positions, retention, metrics."""
        # At least every lease_ttl / 3 (the renewal), and twice a second: a dead node's
        # partitions are taken soon after its leases run out, whatever the TTL.
        interval = min(self.config.lease_ttl / 3, MAX_BEAT)
        with self._owned_scope():
            while True:
                try:
                    await self._join()  # each beat: an empty Redis forgets the namespace
                    self.outbox.wake_relay()
                    await self._tick()
                except Unavailable as exc:
                    logger.debug("cluster: Redis unavailable (%s)", exc)
                    self._expire_leases()
                except ANSWERS() as exc:
                    logger.warning("cluster: Redis refused the beat: %s", exc)
                    self._expire_leases()
                await anyio.sleep(interval)

    # --------------------------------------------------------------- forwarding

    def partition_of(self, event: Event | None, seq: int) -> int:
        key: object = event.partition_key() if event is not None else seq
        return stable_hash(key) % self.config.partitions

    async def forward(self) -> None:
        """Forward committed outbox events after the mark (the forwarder actor).

        While one batch is on its way to Redis the next is read from the outbox.
        """
        outbox = self.outbox
        runtime = self.runtime
        delay = RETRY_INITIAL
        rows: list[OutboxRow] = []
        saved_at = anyio.current_time()
        while not runtime.stopping and self._joined.is_set():
            start = self.forwarded
            if not rows:
                if start >= outbox.head:
                    return
                rows = await self._read(start)
                if not rows:
                    return
            keys, args, tops = self._batch(start, rows)
            following: list[OutboxRow] = []
            failure: Exception | None = None
            async with anyio.create_task_group() as tg:
                if rows[-1].seq < outbox.head:
                    tg.start_soon(self._read_into, following, rows[-1].seq)
                try:
                    top, mark = await self._script("forward", keys, args)
                except Exception as exc:
                    failure = exc
            if failure is not None:
                rows = []
                if not isinstance(failure, _away_or_answered()):
                    raise failure
                if not isinstance(failure, Unavailable):
                    logger.error("cluster: Redis refused forwarded events: %s", failure)
                if runtime.closing:
                    return  # the outbox keeps them: the next run forwards them
                await anyio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_INITIAL
            if int(top) < 0:
                self._lost(int(mark))
                rows = []
                continue
            self.forwarded = int(top)
            for partition, seq in tops.items():
                self._sent.mark(partition, seq)
            rows = following
            # One position write per caught-up backlog (or per SAVE_EVERY s of it), not
            # one commit per batch: a position that lags only makes prune keep more.
            now = anyio.current_time()
            if not rows or now - saved_at >= SAVE_EVERY:
                saved_at = now
                self._save_forwarded(int(top))

    def _lost(self, mark: int) -> None:
        """Redis holds ``mark`` as this node's forwarded seq, below what it forwarded:
        it lost data. Forwarding goes on from ``mark`` (the forward script skips what
        Redis holds, so nothing goes in twice)."""
        logger.warning(
            "cluster: Redis holds seq %d for this node, %d was forwarded: Redis lost "
            "data; forwarding again what the outbox holds from there",
            mark,
            self.forwarded,
        )
        self.forwarded = mark

    async def _read(self, after: int) -> list[OutboxRow]:
        rows: list[OutboxRow] = await self.outbox.store.read(
            partial(read_outbox, after=after, limit=FORWARD_BATCH)
        )
        return rows

    async def _read_into(self, rows: list[OutboxRow], after: int) -> None:
        with contextlib.suppress(EngineError):  # the engine stops: read again next run
            rows.extend(await self._read(after))

    def _batch(
        self, start: int, rows: list[OutboxRow]
    ) -> tuple[list[Any], list[Any], dict[int, int]]:
        """The forward script's keys and arguments for ``rows`` (forwarded up to
        ``start``), and the highest seq of ``rows`` per partition."""
        keys: list[Any] = [self._marks]
        index: dict[int, int] = {}
        tops: dict[int, int] = {}
        args: list[Any] = [self.producer, start]
        for row in rows:
            partition = self.partition_of(row.event, row.seq)
            slot = index.get(partition)
            if slot is None:
                keys.append(self.config.stream(partition))
                slot = index[partition] = len(keys)
            args.extend((row.seq, slot, row.payload, row.trace or ""))
            tops[partition] = row.seq  # rows come in seq order
        return keys, args, tops

    def _save_forwarded(self, seq: int) -> None:
        """The forwarder's position in ``tracking``: prune keeps what is not forwarded."""

        def save(tx: Transaction) -> None:
            tx.conn.execute(
                "INSERT INTO tracking (subscriber, partition, position, partitions, kind, "
                "updated_at) VALUES (?, 0, ?, 1, 'forwarder', ?) ON CONFLICT (subscriber, "
                "partition) DO UPDATE SET position = max(position, excluded.position), "
                "updated_at = excluded.updated_at",
                (FORWARDER, seq, time.time()),
            )

        self.outbox.store.submit(Request(save, kind="positions"), bounded=False)

    @property
    def forwarding_lag(self) -> int:
        return max(0, self.outbox.head - self.forwarded)

    def unsettled(self) -> str | None:
        """What keeps this node from idle (``engine.idle``): events committed here and
        not yet forwarded, or forwarded and not yet read back by this node's readers:
        every node-scope subscription and projection, and the partitions of each
        cluster-scope subscription this node holds, once it took the free ones (the
        others are their holders' to wait for)."""
        lag = self.forwarding_lag
        if lag:
            return f"{lag} events committed here and not yet forwarded to Redis"
        waiting = [name for name in self._cluster_subscriptions if name not in self._balanced]
        if waiting:
            return "cluster-scope subscriptions not yet given partitions: " + ", ".join(waiting)
        sent = self._sent
        behind = [
            f"{name}:{partition}"
            for name, read_back, partitions in self._reading()
            for partition in partitions
            if read_back.of(partition) < sent.of(partition)
        ]
        if behind:
            return "events forwarded from here and not yet read back: " + ", ".join(behind)
        return None

    def _reading(self) -> Iterator[tuple[str, _Seqs, Iterable[int]]]:
        """This node's readers: each node-scope subscription and projection with every
        partition, each cluster-scope subscription with the partitions it holds."""
        every = range(self.config.partitions)
        read_back = self._read_back
        for name in self._followers:
            if name in read_back:
                yield name, read_back[name], every
        for name, leases in self._leased.items():
            if name in read_back:
                yield name, read_back[name], leases

    def _read_through(self, read_back: _Seqs, partition: int, entry: Any) -> None:
        """A reader finished ``entry`` of ``partition``: if this node produced it, what
        it forwarded there is read back up to the entry's seq."""
        producer, seq = entry_origin(entry)
        if producer == self.producer:
            read_back.mark(partition, seq)

    # --------------------------------------------------------------- subscriptions

    def track(self, subscription: Subscription) -> None:
        subscription.live = False  # fed from the streams, never by the local dispatcher

    async def halt(self, subscription: Subscription) -> None:
        """``subscription`` is closing: its readers stop after the entry in hand. A
        cluster-scope one hands its partitions on and leaves their members (other nodes
        take them; its unacknowledged entries come again there); a node-scope one's
        readers end, their positions checkpointed by ``retire``."""
        name = subscription.name
        self._read_back.pop(name, None)  # subscribed again, its new readers read back anew
        if subscription.scope == "cluster":
            self._cluster_subscriptions.pop(name, None)
            self._grouped.discard(name)
            self._balanced.discard(name)
            leases = list(self._leased.pop(name, {}).values())
            async with anyio.create_task_group() as tg:
                for lease in leases:
                    tg.start_soon(self._hand_over, lease)
            with contextlib.suppress(Unavailable):  # its membership expires on its own then
                await self._redis("zrem", self._members(name), [self.config.node])
            self._rebalanced(name)  # it holds none now
            return
        followers = self._followers.pop(name, [])
        for follower in followers:
            follower.stop()
        for follower in followers:
            await follower.ended.wait()

    async def retire(self, subscription: Subscription) -> None:
        """Its actors stopped: the positions its node-scope readers reached are stored
        (subscribing again resumes there)."""
        await self._checkpoint_positions()

    def start(self, subscription: Subscription) -> None:
        read_back = self._read_back[subscription.name] = _Seqs()
        if subscription.scope == "cluster":
            self._cluster_subscriptions[subscription.name] = subscription
            self._leased[subscription.name] = {}
            return
        # Made here, not in the readers' tasks: idle() counts them from now on, and a
        # close that comes before a task started stops it all the same.
        followers = self._followers.setdefault(subscription.name, [])
        for partition in range(self.config.partitions):
            follower = _Follower(read_back)
            followers.append(follower)
            self.runtime.start_task(
                self._follow,
                subscription,
                partition,
                follower,
                name=f"cluster follow {subscription.name}:{partition}",
            )

    async def replay_projection(
        self, subscription: Subscription, event: Event, letter: DeadLetter
    ) -> None:
        await self.outbox.replay_projection(subscription, event, letter)

    async def dead_letter(
        self, name: str, message: Any, error: BaseException, entry: str, trace: str | None
    ) -> None:
        """Dead-letter an entry that does not decode (in a span, traced); returns once
        it is stored."""
        tracing = self.bus.tracing
        if tracing.on:
            tracing.undecodable(f"handle {name}", entry, trace, error)
        stored = anyio.Event()
        self.dead_letters.add(
            name, message, "failed", error=error, attempts=1, entry=entry, then=stored.set
        )
        await stored.wait()

    # ---------------------------------------------------------------------- leases

    async def _tick(self) -> None:
        config = self.config
        node = config.node
        ttl_ms = int(config.lease_ttl * 1000)
        names = list(self._cluster_subscriptions)
        # A node is live while its last beat is younger than a lease TTL (three beats
        # or more): it leaves the count when its leases run out. A subscription's
        # shares count only the live nodes that run it.
        keys = [self._nodes, *(self._members(name) for name in names)]
        beat = await self._script("beat", keys, [node, ttl_ms])
        now_ms = int(beat[0])
        nodes = _names(beat[1], node)
        if nodes != self.live_nodes:
            logger.info("cluster: live nodes %s", ", ".join(nodes))
        self.live_nodes = nodes
        for lease in list(self._leaving):
            await self._script("renew", [lease.key], [lease.token, ttl_ms])
        for name, members in zip(names, beat[2:], strict=True):
            subscription = self._cluster_subscriptions.get(name)
            if subscription is None:
                continue  # closed during the beat
            if name not in self._grouped:
                # Every partition's group exists before entries are trimmed or read.
                for partition in range(config.partitions):
                    await self._ensure_group(config.stream(partition), name)
                self._grouped.add(name)
            share = math.ceil(config.partitions / len(_names(members, node)))
            await self._balance(subscription, self._leased[name], share)
            self._balanced.add(name)
        await self._checkpoint_positions()
        await self._observe(leader=nodes[0] == node, now_ms=now_ms)

    async def _balance(
        self, subscription: Subscription, leases: dict[int, _Lease], share: int
    ) -> None:
        config = self.config
        ttl_ms = int(config.lease_ttl * 1000)
        for partition, lease in list(leases.items()):
            started = anyio.current_time()
            ok = await self._script("renew", [lease.key], [lease.token, ttl_ms])
            if int(ok) == 1:
                lease.valid_until = started + config.lease_ttl * 0.9
            else:
                logger.warning(
                    "cluster: lost the lease of %r partition %d", subscription.name, partition
                )
                self._drop(subscription.name, lease)
        if len(leases) > share:
            for partition in sorted(leases, reverse=True)[: len(leases) - share]:
                lease = leases[partition]
                logger.info(
                    "cluster: handing partition %d of %r on (share %d)",
                    partition,
                    subscription.name,
                    share,
                )
                self._leased.get(subscription.name, {}).pop(partition, None)
                self.runtime.start_task(
                    self._hand_over, lease, name=f"cluster hand over {subscription.name}"
                )
            self._rebalanced(subscription.name)
            return
        if len(leases) >= share:
            return
        with needs_redis(FEATURE):
            import coredis

        offset = stable_hash(config.node) % config.partitions
        before = len(leases)
        for step in range(config.partitions):
            if len(leases) >= share:
                break
            partition = (offset + step) % config.partitions
            if partition in leases:
                continue
            key = f"{config.namespace}:lease:{subscription.name}:{partition}"
            fence = await self._redis("incr", self._fence)
            token = f"{config.node}/{fence}"
            started = anyio.current_time()
            taken = await self._redis("set", key, token, condition=coredis.PureToken.NX, px=ttl_ms)
            if not taken:
                continue
            # Closed during this beat: a throwaway, nothing waits on its marks.
            read_back = self._read_back.get(subscription.name) or _Seqs()
            lease = _Lease(key, partition, token, started + config.lease_ttl * 0.9, read_back)
            leases[partition] = lease
            self.runtime.start_task(
                self._consume,
                subscription,
                lease,
                name=f"cluster consume {subscription.name}:{partition}",
            )
        if len(leases) != before:
            self._rebalanced(subscription.name)

    def _members(self, name: str) -> str:
        return f"{self.config.namespace}:members:{name}"

    def _rebalanced(self, name: str) -> None:
        owned = sorted(self._leased.get(name, {}))
        self.emit(PartitionsRebalanced(subscription=name, owned=owned))
        logger.info(
            "cluster: node %r holds partitions %s of %r",
            self.config.node,
            owned,
            name,
            extra={"subscriber": name},
        )

    def _drop(self, name: str, lease: _Lease) -> None:
        lease.held = False
        self._leased.get(name, {}).pop(lease.partition, None)
        if lease.scope is not None:
            lease.scope.cancel()

    def _expire_leases(self) -> None:
        """Redis does not answer: leases this node cannot renew are not its own anymore."""
        for name, leases in self._leased.items():
            for lease in list(leases.values()):
                if not lease.valid():
                    logger.warning(
                        "cluster: the lease of %r partition %d ran out while Redis was away",
                        name,
                        lease.partition,
                    )
                    self._drop(name, lease)
                    self._balanced.discard(name)  # taken again once Redis answers

    async def _hand_over(self, lease: _Lease) -> None:
        """Stop reading ``lease``'s partition — the entry in hand is finished and
        acknowledged first (for up to three lease TTLs) — then release it for another node."""
        lease.held = False
        self._leaving.add(lease)  # still renewed by the beat meanwhile
        with self._owned_scope():  # leaving the engine cuts it short: the lease expires
            try:
                if lease.scope is not None:
                    lease.scope.cancel()  # a read in progress; handling an entry is shielded
                # A handler that takes longer does not hold the partition for ever: the
                # next owner then handles that entry again (at least once).
                with anyio.move_on_after(HAND_OVER_WAIT * self.config.lease_ttl):
                    await lease.ended.wait()
            finally:
                self._leaving.discard(lease)
            with contextlib.suppress(Unavailable):  # it expires on its own then
                await self._release(lease)

    async def _release(self, lease: _Lease) -> None:
        lease.held = False
        await self._script("release", [lease.key], [lease.token])

    # ------------------------------------------------------------------- readers

    async def _consume(self, subscription: Subscription, lease: _Lease) -> None:
        """Handle one leased partition of a cluster-scope subscription: its pending
        entries first, then new ones; each acknowledged only while the lease holds."""
        with needs_redis(FEATURE):
            from coredis.exceptions import StreamConsumerGroupError

        config = self.config
        runtime = self.runtime
        partition = lease.partition
        stream = config.stream(partition)
        group = subscription.name
        consumer = str(partition)
        reader = _Reader(self, subscription)
        # An engine task: it still hands entries in hand to the actors while the engine drains.
        current_cell.set(self.bus.dispatcher)
        cursor = "0"  # this partition's pending entries (its consumer's) first
        looked = anyio.current_time()
        delay = RETRY_INITIAL
        with self._owned_scope() as scope:
            lease.scope = scope
            try:
                while lease.valid() and not runtime.closing:
                    sent = self._sent.of(partition)  # as in _follow_from
                    try:
                        found = await self._redis(
                            "xreadgroup",
                            group,
                            consumer,
                            {stream: cursor},
                            count=READ_COUNT,
                            block=None if cursor == "0" else BLOCK_MS,
                        )
                    except Unavailable:
                        await anyio.sleep(delay)
                        delay = min(delay * 2, RETRY_MAX)
                        cursor = "0"
                        continue
                    except StreamConsumerGroupError:
                        # The group is gone (Redis restarted without its data): made again,
                        # it reads the stream from its start (what was forwarded again).
                        await self._ensure_group(stream, group)
                        cursor = "0"
                        continue
                    delay = RETRY_INITIAL
                    entries = found.get(stream.encode(), ()) if found else ()
                    if cursor == "0":
                        looked = anyio.current_time()
                        if not entries:
                            cursor = ">"
                            continue
                    elif not entries or anyio.current_time() - looked > PENDING_LOOK:
                        if not entries:  # nothing left for the group: all of it was read
                            lease.read_back.mark(partition, sent)
                        # Pending entries again now and then: a reader that held this
                        # partition before may have taken entries it could not handle.
                        cursor = "0"
                    for entry in entries:
                        if not lease.valid() or runtime.stopping:
                            return
                        outcome = await self._handle_leased(reader, lease, stream, group, entry)
                        if outcome is None:
                            return
                        if not outcome:  # not acknowledged: read the pending ones again
                            cursor = "0"
                            await anyio.sleep(RETRY_INITIAL)
                            break
                        self._read_through(lease.read_back, partition, entry)
            finally:
                lease.scope = None
                lease.ended.set()

    async def _handle_leased(
        self, reader: _Reader, lease: _Lease, stream: str, group: str, entry: Any
    ) -> bool | None:
        """Handle one entry of a leased partition and acknowledge it while the lease holds.

        True when acknowledged; False when Redis did not take the acknowledgement (the
        entry stays pending: read again); None when reading must stop (cut short by
        shutdown, or the lease moved on).
        """
        runtime = self.runtime
        runtime.busy()
        try:
            with anyio.CancelScope(shield=True):
                if not await reader.handle(lease.partition, lease.partition, entry):
                    return None
                try:
                    acked = await self._script(
                        "ack", [lease.key, stream], [lease.token, group, entry.identifier]
                    )
                except _away_or_answered():
                    return False  # not taken (Redis away, or its group gone): read again
        finally:
            runtime.idle()
        if int(acked) < 0:
            logger.warning(
                "cluster: partition %d of %r moved on; entry %s not acknowledged",
                lease.partition,
                group,
                entry.identifier.decode(),
            )
            self._drop(group, lease)
            return None
        return True

    async def _ensure_group(self, stream: str, group: str) -> None:
        with needs_redis(FEATURE):
            from coredis.exceptions import StreamDuplicateConsumerGroupError

        with contextlib.suppress(StreamDuplicateConsumerGroupError):  # made by another node
            await self._redis("xgroup_create", stream, group, identifier="0", mkstream=True)

    async def _follow(
        self, subscription: Subscription, partition: int, follower: _Follower
    ) -> None:
        """Read every entry of one partition for a node-scope subscription or a
        projection, from the position kept in this node's database."""
        stream = self.config.stream(partition)
        try:
            await self._follow_from(subscription, partition, stream, follower)
        finally:
            follower.ended.set()

    async def _follow_from(
        self, subscription: Subscription, partition: int, stream: str, follower: _Follower
    ) -> None:
        runtime = self.runtime
        name = subscription.name
        position = await self.outbox.store.read(lambda conn: _load_position(conn, name, partition))
        reader = _Reader(self, subscription)
        current_cell.set(self.bus.dispatcher)  # an engine task: it delivers while draining
        delay = RETRY_INITIAL
        # Known from the start: retention keeps what this reader has not read yet.
        self._positions_seen[(name, partition)] = position
        with self._owned_scope() as scope:
            follower.scope = scope
            if follower.stopped:
                return  # closed while it started
            await self._joined.wait()
            await self._publish_position(name, partition, position)
            while not runtime.closing:
                # In Redis before this read began: read back if it finds nothing newer.
                sent = self._sent.of(partition)
                try:
                    found = await self._redis(
                        "xread", {stream: format_id(position)}, count=READ_COUNT, block=BLOCK_MS
                    )
                except Unavailable:
                    await anyio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                delay = RETRY_INITIAL
                entries = found.get(stream.encode(), ()) if found else ()
                if not entries:
                    follower.read_back.mark(partition, sent)
                for entry in entries:
                    if runtime.stopping or follower.stopped:
                        return
                    entry_position = parse_id(entry.identifier)
                    runtime.busy()
                    try:
                        with anyio.CancelScope(shield=True):
                            if subscription.projector is not None:
                                await self._project(subscription, partition, entry)
                            elif not await reader.handle(partition, None, entry):
                                return
                            self._positions_seen[(name, partition)] = entry_position
                            self._read_through(follower.read_back, partition, entry)
                    finally:
                        runtime.idle()
                    position = entry_position

    async def _project(self, subscription: Subscription, partition: int, entry: Any) -> None:
        """Apply one entry to a projection, exactly once: its writes, its dead letter
        (if it keeps failing) and its position commit together."""
        projector = subscription.projector
        assert projector is not None
        name = subscription.name
        entry_id = entry.identifier.decode()
        position = parse_id(entry_id)
        payload = entry.field_values.get(b"e", b"")
        producer, seq = entry_origin(entry)
        dead_letters = self.dead_letters
        attempts = subscription.max_attempts
        tracing = self.bus.tracing
        trace = entry_trace(entry)

        def apply(tx: Transaction) -> DeadLetter | None:
            conn = tx.conn
            row = conn.execute(
                "SELECT ms, seq FROM cluster_positions WHERE subscriber = ? AND partition = ?",
                (name, partition),
            ).fetchone()
            if row is not None and (row[0], row[1]) >= position:
                return None  # applied before a crash: exactly once
            # By producer and seq too: events forwarded again (Redis lost its data)
            # come back under new entry ids.
            applied = conn.execute(
                "SELECT seq FROM cluster_applied WHERE subscriber = ? AND partition = ? "
                "AND producer = ?",
                (name, partition, producer),
            ).fetchone()
            if producer and seq and applied is not None and applied[0] >= seq:
                _save_position(conn, name, partition, position)
                return None
            letter = None
            try:
                event = decode(payload)
            except EventDecodeError as exc:
                if tracing.on:
                    tracing.undecodable(f"project {name}", entry_id, trace, exc)
                letter = dead_letters.insert_row(
                    conn, name, bytes(payload), "failed", exc, 1, entry=entry_id
                )
            else:
                if subscription.matches(type(event)):
                    error = project_event(
                        tracing, name, tx, projector, event, attempts, seq or None, trace
                    )
                    if error is not None:
                        letter = dead_letters.insert_row(
                            conn, name, event, "failed", error, attempts, entry=entry_id
                        )
            _save_position(conn, name, partition, position)
            if producer and seq:
                conn.execute(
                    "INSERT INTO cluster_applied (subscriber, partition, producer, seq) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (subscriber, partition, producer) "
                    "DO UPDATE SET seq = max(seq, excluded.seq)",
                    (name, partition, producer, seq),
                )
            return letter

        letter = await self.outbox.store.call(apply, kind="projection", background=True)
        if letter is not None:
            dead_letters.restored(letter)

    async def forget(self, name: str) -> int:
        """``engine.forget`` on a cluster node: the stored positions (the outbox's and
        this node's in the streams), the retention position it publishes for ``name``,
        and, when no live node runs ``name`` in cluster scope, its consumer groups
        (``ValueError`` naming the nodes that still run it; nothing is dropped then)."""
        config = self.config
        away: Unavailable | None = None
        try:
            groups = await self._forget_groups(name)
        except Unavailable as exc:
            away, groups = exc, 0
        try:
            forgotten = await self.outbox.forget(name)
        except KeyError:
            if away is not None:
                raise Unavailable(
                    f"no positions of {name!r} in this node's database, and Redis at "
                    f"{redact(config.url)} does not answer: its consumer groups were not "
                    "looked for; try again once it does"
                ) from away
            if not groups:
                raise
            forgotten = 0
        if away is not None:
            logger.warning(
                "cluster: forget %r: Redis does not answer, its consumer groups (if any) "
                "stay in the streams",
                name,
            )
        fields = [f"{config.node}|{name}|{partition}" for partition in range(config.partitions)]
        with contextlib.suppress(Unavailable):  # then retention keeps its entries longer
            await self._redis("hdel", self._positions, fields)
        return forgotten + groups

    async def _forget_groups(self, name: str) -> int:
        """Destroy the consumer groups of ``name`` when no live node runs it in cluster
        scope; how many partitions had one. A node that subscribes it later makes them
        again, from the streams' start."""
        config = self.config
        streams = [config.stream(partition) for partition in range(config.partitions)]
        destroyed, live = await self._script("forget", [self._members(name), *streams], [name])
        if int(destroyed) < 0:
            nodes = ", ".join(sorted(n.decode() if isinstance(n, bytes) else str(n) for n in live))
            raise ValueError(
                f"subscription {name!r} still runs in cluster scope on node(s) {nodes}: "
                "close it there before forgetting it"
            )
        return int(destroyed)

    async def _publish_position(self, name: str, partition: int, position: tuple[int, int]) -> None:
        """Tell retention where a node-scope reader starts, before it reads."""
        field = f"{self.config.node}|{name}|{partition}"
        with contextlib.suppress(Unavailable):  # the next checkpoint publishes it
            await self._redis("hsetnx", self._positions, field, format_id(position))

    async def _checkpoint_positions(self) -> None:
        """Save the node-scope positions that moved; publish them for retention."""
        moved = {
            key: position
            for key, position in self._positions_seen.items()
            if self._positions_saved.get(key) != position
        }
        if not moved:
            return

        def save(tx: Transaction) -> None:
            for (name, partition), position in moved.items():
                _save_position(tx.conn, name, partition, position)

        await self.outbox.store.call(save, kind="positions", background=True)
        self._positions_saved.update(moved)
        node = self.config.node
        await self._redis(
            "hset",
            self._positions,
            {f"{node}|{n}|{p}": format_id(pos) for (n, p), pos in moved.items()},
        )

    # --------------------------------------------------------------- retention

    async def _observe(self, *, leader: bool, now_ms: int) -> None:
        """Lag per cluster-scope subscription and partition; the leader trims."""
        with needs_redis(FEATURE):
            import coredis

        config = self.config
        lag: dict[str, dict[int, int]] = {name: {} for name in self._cluster_subscriptions}
        positions: dict[int, list[tuple[int, int]]] = {}
        if leader:
            published = await self._redis("hgetall", self._positions)
            for field, value in published.items():
                text = field.decode() if isinstance(field, bytes) else str(field)
                try:
                    partition = int(text.rsplit("|", 1)[1])
                    positions.setdefault(partition, []).append(parse_id(value))
                except (IndexError, ValueError):
                    continue
        for partition in range(config.partitions):
            stream = config.stream(partition)
            try:
                groups = await self._redis("xinfo_groups", stream)
            except ANSWERS():
                groups = ()  # no stream yet
            floors: list[tuple[int, int]] = []
            for group in groups:
                name = group[b"name"].decode()
                if name in lag and group.get(b"lag") is not None:
                    lag[name][partition] = int(group[b"lag"])
                if leader:
                    floors.append(await self._group_floor(stream, name, group))
            if not leader:
                continue
            floors.extend((ms, seq + 1) for ms, seq in positions.get(partition, ()))
            if floors:
                # Entries younger than two lease TTLs stay whatever the floors say: a
                # node starting now registers its readers' positions within that time.
                floors.append((now_ms - int(2000 * config.lease_ttl), 0))
                trimmed = await self._redis(
                    "xtrim", stream, coredis.PureToken.MINID, format_id(min(floors))
                )
                self.trimmed += int(trimmed)
            if config.max_len is not None:
                trimmed = await self._redis(
                    "xtrim", stream, coredis.PureToken.MAXLEN, config.max_len
                )
                self.trimmed += int(trimmed)
        self._lag = lag

    async def _group_floor(self, stream: str, name: str, group: Any) -> tuple[int, int]:
        """The lowest entry id ``name`` still needs: its oldest pending one, or the one
        after the last it was given."""
        if int(group.get(b"pending") or 0):
            summary = await self._redis("xpending", stream, name)
            lowest = summary.minimum_identifier
            if lowest is not None:
                return parse_id(lowest)
        last = parse_id(group.get(b"last-delivered-id") or b"0-0")
        return (last[0], last[1] + 1)

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> ClusterMetrics:
        return ClusterMetrics(
            node=self.config.node,
            connected=self.connected,
            live_nodes=list(self.live_nodes),
            owned={name: sorted(leases) for name, leases in self._leased.items()},
            forwarding_lag=self.forwarding_lag,
            lag={name: dict(self._lag.get(name, {})) for name in self._cluster_subscriptions},
            trimmed=self.trimmed,
        )


def _producer_id(tx: Transaction) -> str:
    """This database's producer id: random, made once and kept in the database."""
    import secrets

    conn = tx.conn
    row = conn.execute("SELECT value FROM cluster WHERE key = 'producer'").fetchone()
    if row is not None:
        return str(row[0])
    producer = secrets.token_hex(8)
    conn.execute("INSERT INTO cluster (key, value) VALUES ('producer', ?)", (producer,))
    return producer


def _load_position(conn: Any, name: str, partition: int) -> tuple[int, int]:
    row = conn.execute(
        "SELECT ms, seq FROM cluster_positions WHERE subscriber = ? AND partition = ?",
        (name, partition),
    ).fetchone()
    return (int(row[0]), int(row[1])) if row is not None else (0, 0)


def _save_position(conn: Any, name: str, partition: int, position: tuple[int, int]) -> None:
    conn.execute(
        "INSERT INTO cluster_positions (subscriber, partition, ms, seq) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (subscriber, partition) DO UPDATE SET ms = excluded.ms, seq = excluded.seq "
        "WHERE (excluded.ms, excluded.seq) > (ms, seq)",
        (name, partition, position[0], position[1]),
    )


def _names(members: Any, node: str) -> list[str]:
    """Node names from a ZRANGE reply, this node always among them."""
    names = {m.decode() if isinstance(m, bytes) else str(m) for m in members}
    names.add(node)
    return sorted(names)
