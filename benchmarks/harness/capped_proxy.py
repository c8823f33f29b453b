"""A loopback TCP proxy that caps each connection's bandwidth: a WAN link per connection, on one machine.

On loopback one connection to the S3 server is as fast as many, so the gain of uploading parts in
parallel cannot show. Behind this proxy every connection is held to ``bytes_per_s`` in each
direction (a token bucket per connection and direction), as a long-haul link holds each TCP stream
to its window over the round trip; N connections then move up to N times as much, until the server
or the CPUs are the limit. Nothing else is changed: the bytes pass through untouched, so it works
for any TCP protocol (here HTTP to moto)::

    with CappedProxy(("127.0.0.1", moto_port), 20e6) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.url)   # every connection at most 20 MB/s each way
        ...
        proxy.stats()                                       # connections accepted, bytes per connection

One thread accepts; each connection gets two pumping threads (client to server, server to client),
which read at most ``chunk`` bytes, take that many tokens (sleeping until the bucket has them), and
forward them. ``close()`` stops accepting, shuts every socket down and joins every thread.

``python benchmarks/harness/capped_proxy.py [--mb 40] [--mbps 20]`` checks the cap: one connection
moves ``--mb`` MB each way through the proxy to a local sink (40 MB at 20 MB/s: about 2 s each way).
Stdlib only.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

CHUNK = 64 * 2**10
SLOT_S = 0.1  # the time slots in which connections count as moving bytes at once (ProxyStats.since)
ACTIVE_BYTES = CHUNK  # what a connection moves in a slot to count as active in it


class TokenBucket:
    """``rate`` bytes a second, at most ``burst`` at once; ``take`` blocks until the bytes are allowed."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = time.monotonic()

    def take(self, n: int, stop: threading.Event) -> None:
        while not stop.is_set():
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= n:
                self._tokens -= n
                return
            stop.wait((n - self._tokens) / self.rate)  # the pacing itself; wakes early on close()


@dataclass
class Link:
    """One proxied connection: bytes forwarded client to server (``up``) and server to client (``down``).

    ``slots``: bytes forwarded (both ways) in each ``SLOT_S`` slot of ``time.monotonic()``, to count how
    many connections move bytes at the same time (a pool may carry sequential parts on many connections).
    """

    number: int
    up: int = 0
    down: int = 0
    open: bool = True
    slots: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ProxyStats:
    connections: int
    open_connections: int
    up_bytes: int
    down_bytes: int
    per_connection: tuple[tuple[int, int], ...]  # (up, down) bytes of every connection so far, in accept order
    slot: int  # the SLOT_S slot this snapshot was taken in
    active: dict[int, int]  # slot: how many connections moved >= ACTIVE_BYTES in it

    def since(self, before: ProxyStats, min_bytes: int = 2**20) -> dict[str, Any]:
        """What happened between ``before`` and this snapshot.

        Bytes moved, connections opened, connections that carried at least ``min_bytes`` (``connections_used``),
        and how many moved bytes at the same time: per ``SLOT_S`` slot with any traffic, the connections that
        moved at least ``ACTIVE_BYTES`` in it (``parallel_median``, ``parallel_max``; handovers between two
        connections inside one slot can add one to a slot, hence the median).
        """
        old = before.per_connection
        moved = [
            (up - (old[i][0] if i < len(old) else 0), down - (old[i][1] if i < len(old) else 0))
            for i, (up, down) in enumerate(self.per_connection)
        ]
        parallel = sorted(n for slot, n in self.active.items() if before.slot < slot < self.slot and n > 0)
        return {
            "new_connections": self.connections - before.connections,
            "up_bytes": self.up_bytes - before.up_bytes,
            "down_bytes": self.down_bytes - before.down_bytes,
            "connections_used": sum(1 for up, down in moved if up + down >= min_bytes),
            "parallel_median": parallel[len(parallel) // 2] if parallel else 0,
            "parallel_max": parallel[-1] if parallel else 0,
        }


class CappedProxy:
    """Listens on ``host``:0 and forwards to ``target``, each connection capped to ``bytes_per_s`` each way."""

    def __init__(
        self, target: tuple[str, int], bytes_per_s: float, *, host: str = "127.0.0.1", chunk: int = CHUNK
    ) -> None:
        if bytes_per_s <= 0:
            raise ValueError(f"bytes_per_s must be > 0, got {bytes_per_s!r}")
        self.target = target
        self.bytes_per_s = float(bytes_per_s)
        self.chunk = chunk
        # 20 ms worth of bytes, and at least one chunk: smooth at the scale of an HTTP part.
        self.burst = max(float(chunk), self.bytes_per_s / 50)
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.1)  # accept() polls so that close() is seen
        self.host, self.port = self._listener.getsockname()[:2]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._links: list[Link] = []
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="capped-proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stats(self) -> ProxyStats:
        with self._lock:
            links = [(link.up, link.down, link.open) for link in self._links]
            active: dict[int, int] = {}
            for link in self._links:
                for slot, nbytes in list(link.slots.items()):
                    active[slot] = active.get(slot, 0) + (nbytes >= ACTIVE_BYTES)
        return ProxyStats(
            connections=len(links),
            open_connections=sum(1 for *_, is_open in links if is_open),
            up_bytes=sum(up for up, _, _ in links),
            down_bytes=sum(down for _, down, _ in links),
            per_connection=tuple((up, down) for up, down, _ in links),
            slot=int(time.monotonic() / SLOT_S),
            active=active,
        )

    def close(self) -> None:
        """Stop accepting, shut every connection down, join every thread. Idempotent."""
        self._stop.set()
        self._acceptor.join()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
            threads = list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join()

    def __enter__(self) -> CappedProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- the threads ------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stop.is_set():
                    client.close()
                    server.close()
                    return
                link = Link(len(self._links))
                self._links.append(link)
                self._sockets.update((client, server))
                ends = _Ends(client, server, self)
                for src, dst, direction in ((client, server, "up"), (server, client, "down")):
                    thread = threading.Thread(
                        target=self._pump,
                        args=(src, dst, link, direction, ends),
                        name=f"capped-proxy-{link.number}-{direction}",
                        daemon=True,
                    )
                    self._threads.append(thread)
                    thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, link: Link, direction: str, ends: _Ends) -> None:
        bucket = TokenBucket(self.bytes_per_s, self.burst)
        clean = False
        while not self._stop.is_set():
            try:
                data = src.recv(self.chunk)
            except OSError:
                break
            if not data:
                clean = True
                break
            bucket.take(len(data), self._stop)
            try:
                dst.sendall(data)
            except OSError:
                break
            if direction == "up":
                link.up += len(data)
            else:
                link.down += len(data)
            slot = int(time.monotonic() / SLOT_S)
            link.slots[slot] = link.slots.get(slot, 0) + len(data)
        with contextlib.suppress(OSError):
            if clean:  # pass the end of stream on; the other direction goes on until its own end
                dst.shutdown(socket.SHUT_WR)
            else:  # a reset or close(): end both directions at once
                src.shutdown(socket.SHUT_RDWR)
                dst.shutdown(socket.SHUT_RDWR)
        ends.done(link)


class _Ends:
    """Closes a connection's two sockets when both of its pumps have finished."""

    def __init__(self, client: socket.socket, server: socket.socket, proxy: CappedProxy) -> None:
        self._sockets = (client, server)
        self._proxy = proxy
        self._left = 2

    def done(self, link: Link) -> None:
        with self._proxy._lock:
            self._left -= 1
            if self._left:
                return
            link.open = False
            for sock in self._sockets:
                self._proxy._sockets.discard(sock)
                sock.close()


# ---- checking the cap -----------------------------------------------------------------------------
def _sink(listener: socket.socket, nbytes: int, direction: str, received: list[int]) -> None:
    """One connection: read to end of stream (``up``), or send ``nbytes`` and close (``down``)."""
    conn, _ = listener.accept()
    with conn:
        if direction == "up":
            total = 0
            while data := conn.recv(CHUNK):
                total += len(data)
            received.append(total)
            conn.sendall(b"ok")
        else:
            block = b"\0" * CHUNK
            left = nbytes
            while left > 0:
                conn.sendall(block[: min(left, CHUNK)])
                left -= min(left, CHUNK)


def transfer_s(endpoint: tuple[str, int], target: socket.socket, nbytes: int, direction: str) -> float:
    """Seconds for one connection to ``endpoint`` to move ``nbytes`` to (``up``) or from (``down``) a sink."""
    received: list[int] = []
    sink = threading.Thread(target=_sink, args=(target, nbytes, direction, received), daemon=True)
    sink.start()
    start = time.perf_counter()
    with socket.create_connection(endpoint) as conn:
        if direction == "up":
            block = b"\0" * CHUNK
            left = nbytes
            while left > 0:
                conn.sendall(block[: min(left, CHUNK)])
                left -= min(left, CHUNK)
            conn.shutdown(socket.SHUT_WR)
            reply = conn.recv(2)  # the sink answers once it has every byte
            if reply != b"ok":
                raise RuntimeError(f"the sink answered {reply!r}")
        else:
            total = 0
            while data := conn.recv(CHUNK):
                total += len(data)
            if total != nbytes:
                raise RuntimeError(f"received {total} bytes of {nbytes}")
    elapsed = time.perf_counter() - start
    sink.join()
    if direction == "up" and received != [nbytes]:
        raise RuntimeError(f"the sink received {received} bytes of {nbytes}")
    return elapsed


def check_cap(bytes_per_s: float, nbytes: int) -> dict[str, Any]:
    """Move ``nbytes`` each way through one capped connection, and directly; the rates and the cap."""
    out: dict[str, Any] = {"cap_bytes_per_s": bytes_per_s, "bytes": nbytes}
    with socket.create_server(("127.0.0.1", 0)) as target:
        address = target.getsockname()[:2]
        with CappedProxy(address, bytes_per_s) as proxy:
            for direction in ("up", "down"):
                seconds = transfer_s((proxy.host, proxy.port), target, nbytes, direction)
                out[f"{direction}_s"] = seconds
                out[f"{direction}_bytes_per_s"] = nbytes / seconds
            out["proxy_connections"] = proxy.stats().connections
        seconds = transfer_s(address, target, nbytes, "up")
        out["direct_up_bytes_per_s"] = nbytes / seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Check the capped proxy's per-connection cap.")
    parser.add_argument("--mb", type=float, default=40, help="MB (1e6 bytes) each way through one connection")
    parser.add_argument("--mbps", type=float, default=20, help="the cap, MB/s per connection and direction")
    args = parser.parse_args()
    result = check_cap(args.mbps * 1e6, int(args.mb * 1e6))
    expected = args.mb / args.mbps
    for direction in ("up", "down"):
        seconds, rate = result[f"{direction}_s"], result[f"{direction}_bytes_per_s"] / 1e6
        print(
            f"{direction:>4}: {args.mb:g} MB in {seconds:.2f} s ({rate:.1f} MB/s; "
            f"cap {args.mbps:g} MB/s: ~{expected:.2f} s)"
        )
    print(f"without the proxy: {result['direct_up_bytes_per_s'] / 1e6:.0f} MB/s")


if __name__ == "__main__":
    main()
