"""kombu's filesystem transport, with messages written atomically and folders that come back.

The stock transport creates a message file and then writes it; a consumer polling the folder
can take the file while it is still empty and lose the message (JSONDecodeError). Writing to
a hidden temporary name and renaming it into place makes a message appear whole or not at all.

Its folders live in the data directory, which a user may delete while `taskdock dev` runs:
the stock transport then raises FileNotFoundError from the worker's poll and the worker dies.
Here a missing folder is made again, and the poll finds it empty.

Celery's events go through an exchange that copies each one into the queue of every monitor
bound to it (Flower, `celery events`), and the stock transport never removes a binding: once a
monitor has stopped, every event of every worker is still written to its queue, for ever, and
every poll lists the growing folder. Here a queue declared with an expiry (Celery's event
queues: 60 s; a worker's control queue: 10 s) is unbound and emptied once nobody has read it for
that long, as RabbitMQ does with x-expires; a consumer that comes back binds it again.

A worker polls the folder, and kombu's polling loop sleeps the whole interval whenever a poll
brings nothing, also when what held it back is a full prefetch window (Celery's acks_late with
prefetch 1: one message per pool process until it is acked). Every window then waited for the
next poll, not for its ack, and a worker ran at most its concurrency per polling interval: 20
tasks a second under `taskdock dev`, whatever they cost. Here an ack or a reject wakes the loop
at once; an empty folder is still polled at the interval.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any, cast

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.transport.base import to_rabbitmq_queue_arguments  # type: ignore[attr-defined]
from kombu.utils.json import dumps
from kombu.utils.scheduling import FairCycle

# A consumer marks its expiring queue as read at most this often; a publisher checks a queue's
# mark at most this often.
MARK_INTERVAL = 5.0


class Channel(filesystem.Channel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._expiring: dict[str, float] = {}  # this channel's expiring queues: seconds
        self._marked: dict[str, float] = {}  # when this channel last marked each as read
        self._fresh_until: dict[str, float] = {}  # bound queues known to be read, until when
        super().__init__(*args, **kwargs)

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple=multiple)
        cast(Transport, self.connection).window_freed.set()

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue=requeue)
        cast(Transport, self.connection).window_freed.set()

    # The stubs of kombu's two base classes disagree on this signature; the runtime one is this.
    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        # Starts with a dot: `_get` only takes names ending in ".<queue>.msg" after the first dot.
        partial = os.path.join(self.data_folder_out, f".{uuid.uuid4()}.partial")
        try:
            try:
                handle = open(partial, "wb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                self._make_folders()
                handle = open(partial, "wb")  # noqa: SIM115 - closed below
            with handle:
                handle.write(dumps(payload).encode())
            os.replace(partial, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            raise ChannelError(f"cannot add {name!r} to the queue folder") from exc

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        if queue in self._marked:
            self._mark_read(queue)
        try:
            return super()._get(queue)
        except FileNotFoundError:
            self._make_folders()
            raise Empty() from None

    # Queues declared with an expiry: while a consumer reads one, it keeps a file in the control
    # folder fresh. The file holds the expiry in seconds; a publisher looking up an exchange's
    # bindings drops those whose file went stale, and a consumer declares and reads its queue
    # on one channel (as kombu's and Celery's consumers do).

    def prepare_queue_arguments(self, arguments: Any, **kwargs: Any) -> Any:
        # As kombu's Redis channel does: `expires` and `message_ttl` become x-arguments.
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        expires = (kwargs.get("arguments") or {}).get("x-expires")
        if expires:
            self._expiring[queue] = float(expires) / 1000

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str | None, queue: str) -> None:
        super()._queue_bind(exchange, routing_key, pattern, queue)
        if queue in self._expiring:
            self.control_folder.mkdir(parents=True, exist_ok=True)
            self._expiry_file(queue).write_text(str(self._expiring[queue]))
            self._marked[queue] = monotonic()

    def _mark_read(self, queue: str) -> None:
        if monotonic() - self._marked[queue] < MARK_INTERVAL:
            return
        self._marked[queue] = monotonic()
        try:
            os.utime(self._expiry_file(queue))
        except FileNotFoundError:
            # This consumer was away past the expiry and a publisher dropped its queue: as a
            # RabbitMQ client would declare it again, bind it again.
            for exchange, routing_key, arguments in self.state.queue_bindings(queue):
                meta = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
                self._queue_bind(exchange, meta[0], meta[1], queue)

    def get_table(self, exchange: str) -> list[Any]:
        live = []
        for binding in super().get_table(exchange):
            if self._expired(binding.queue):
                self._delete(binding.queue, exchange, binding.routing_key, binding.pattern)
                self._purge(binding.queue)
            else:
                live.append(binding)
        return live

    def _delete(self, queue: str, exchange: str, *args: Any, **kwargs: Any) -> None:
        super()._delete(queue, exchange, *args, **kwargs)
        self._expiry_file(queue).unlink(missing_ok=True)

    def _expired(self, queue: str) -> bool:
        if self._fresh_until.get(queue, 0.0) > monotonic():
            return False
        try:
            expires = float(self._expiry_file(queue).read_text())
            unread = time.time() - self._expiry_file(queue).stat().st_mtime
        except (FileNotFoundError, ValueError):
            expires, unread = MARK_INTERVAL * 4, 0.0  # declared without an expiry
        if unread > expires:
            return True
        self._fresh_until[queue] = monotonic() + min(MARK_INTERVAL, expires / 4)
        return False

    def _expiry_file(self, queue: str) -> Path:
        return Path(self.control_folder) / f"{queue}.expires"

    def _size(self, queue: str) -> int:
        try:
            return int(super()._size(queue))
        except FileNotFoundError:
            self._make_folders()
            return 0

    def _purge(self, queue: str) -> int:
        try:
            return int(super()._purge(queue))
        except FileNotFoundError:
            self._make_folders()
            return 0

    def _make_folders(self) -> None:
        for folder in {self.data_folder_in, self.data_folder_out, self.processed_folder}:
            os.makedirs(folder, exist_ok=True)
        self.control_folder.mkdir(parents=True, exist_ok=True)


class Transport(filesystem.Transport):
    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set by every ack and reject on this connection's channels (from whichever thread
        # Celery acks in): a prefetch window may have room again.
        self.window_freed = threading.Event()

    def drain_events(self, connection: Any, timeout: float | None = None, **_: Any) -> None:
        """kombu's virtual Transport.drain_events, but the pause after a poll that brought
        nothing ends at the next ack or reject, not only at the polling interval. The pause
        was a full interval even when the consumer's prefetch window was what stopped the poll
        (the same family as celery/celery#10263, an ack deferred in Celery's blocking loop)."""
        started = monotonic()
        cycle = cast(FairCycle, self.cycle)  # made by kombu's __init__
        interval = self.polling_interval
        if timeout and interval and interval > timeout:
            interval = timeout
        while True:
            # Cleared before the poll: an ack landing after it still cuts the pause short.
            self.window_freed.clear()
            try:
                cycle.get(self._deliver, timeout=timeout)
            except Empty:
                if timeout is not None and monotonic() - started >= timeout:
                    raise TimeoutError() from None  # socket.timeout, as kombu raises
                if interval is not None:
                    self.window_freed.wait(interval)
            else:
                return
