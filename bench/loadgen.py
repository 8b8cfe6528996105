"""The load generator: runs in its own process (multiprocessing, spawn) and drives raw sockets.

The harness sends one job at a time over a pipe and waits (bounded) for its result. Bulk jobs
use one thread per connection with blocking sockets (send/recv and hashlib release the GIL);
ping-pong, short-connection and idle-connection jobs use one thread and a selector.

Every job returns a dict; ``errors`` lists what went wrong (strings), and ``corrupt`` is
True when bytes arrived that differ from what was sent (the harness then fails the run).
"""

from __future__ import annotations

import errno
import hashlib
import selectors
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from bench.pattern import HEADER, REPLY, REQUEST, chunks, digest

HOST = "127.0.0.1"
IO_TIMEOUT = 60.0  # any single blocking socket call
RECV_SIZE = 256 * 1024
MSG = 64  # ping-pong message size
#: Idle connections opened from one loopback source address (below the relay's cap of 256).
IDLE_PER_SOURCE = 200

_digests: dict[tuple[int, int], bytes] = {}
_idle: list[socket.socket] = []


def _expected(seed: int, size: int) -> bytes:
    key = (seed, size)
    if key not in _digests:
        _digests[key] = digest(seed, size)
    return _digests[key]


def _connect(port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    for _ in range(n + 1):  # each recv returns at least one byte or ends the loop
        if len(data) >= n:
            break
        part = sock.recv(n - len(data))
        if not part:
            break
        data += part
    return bytes(data)


# --- bulk -------------------------------------------------------------------------------


def _upload(sock: socket.socket, seed: int, size: int) -> str | None:
    sock.sendall(HEADER.pack(size))
    for view in chunks(seed, size):
        sock.sendall(view)
    reply = _recv_exact(sock, REPLY.size)
    if len(reply) != REPLY.size:
        return f"upload seed {seed}: sink reply cut short ({len(reply)} of {REPLY.size} bytes)"
    count, got = REPLY.unpack(reply)
    if count != size:
        return f"upload seed {seed}: sink received {count} bytes, {size} were sent"
    if got != _expected(seed, size):
        return f"upload seed {seed}: SHA-256 at the sink differs from the bytes sent"
    return None


def _download(sock: socket.socket, seed: int, size: int) -> str | None:
    sock.sendall(REQUEST.pack(size, seed))
    h = hashlib.sha256()
    buf = bytearray(RECV_SIZE)
    view = memoryview(buf)
    total = 0
    for _ in range(size + 2):  # bounded: every recv returns >= 1 byte or ends the loop
        n = sock.recv_into(view)
        if n == 0:
            break
        h.update(view[:n])
        total += n
    if total != size:
        return f"download seed {seed}: received {total} bytes, the source sent {size}"
    if h.digest() != _expected(seed, size):
        return f"download seed {seed}: SHA-256 of the received bytes differs from the pattern"
    return None


def bulk(port: int, conns: int, size: int, direction: str, seed0: int,
         timeout: float) -> dict[str, Any]:
    for i in range(conns):  # outside the timed part
        _expected(seed0 + i, size)
    socks = [_connect(port) for _ in range(conns)]
    barrier = threading.Barrier(conns + 1, timeout=timeout)
    results: list[str | None] = ["did not finish"] * conns
    ends = [0.0] * conns
    action = _upload if direction == "up" else _download

    def run(i: int) -> None:
        sock = socks[i]
        try:
            barrier.wait()
            results[i] = action(sock, seed0 + i, size)
        except Exception as exc:
            results[i] = f"{direction} seed {seed0 + i}: {type(exc).__name__}: {exc}"
        finally:
            ends[i] = time.perf_counter()
            sock.close()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(conns)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    deadline = start + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    elapsed = max(ends) - start if all(ends) else float("nan")
    errors = [r for r in results if r is not None]
    return {
        "bytes": conns * size,
        "seconds": elapsed,
        "mb_s": conns * size / elapsed / 1e6 if errors == [] else None,
        "errors": errors[:10],
        "n_errors": len(errors),
        "corrupt": bool(errors),  # a cut-short or wrong transfer is lost or corrupt data
    }


# --- ping-pong --------------------------------------------------------------------------


def _message(i: int) -> bytes:
    return struct.pack("!Q", i) * (MSG // 8)


def pingpong(port: int, conns: int, per_conn: int, duration: float,
             warmup: int = 20) -> dict[str, Any]:
    socks = [_connect(port) for _ in range(conns)]
    try:
        for sock in socks:  # warm-up: the path is open end to end before timing starts
            for i in range(warmup):
                sock.sendall(_message(i))
                if _recv_exact(sock, MSG) != _message(i):
                    return {"errors": ["echo returned different bytes (warm-up)"],
                            "corrupt": True}
        if conns == 1:
            rtts, errors, corrupt = _pingpong_one(socks[0], per_conn, duration)
        else:
            rtts, errors, corrupt = _pingpong_many(socks, per_conn, duration)
    finally:
        for sock in socks:
            sock.close()
    rtts.sort()
    return {
        "n": len(rtts),
        "p50_us": _percentile(rtts, 0.50),
        "p99_us": _percentile(rtts, 0.99),
        "mean_us": sum(rtts) / len(rtts) if rtts else float("nan"),
        "errors": errors[:10],
        "n_errors": len(errors),
        "corrupt": corrupt or bool(errors),
    }


def _pingpong_one(sock: socket.socket, count: int,
                  duration: float) -> tuple[list[float], list[str], bool]:
    rtts: list[float] = []
    deadline = time.perf_counter() + duration
    clock = time.perf_counter_ns
    for i in range(count):
        msg = _message(i)
        t0 = clock()
        sock.sendall(msg)
        got = sock.recv(MSG)
        if len(got) < MSG:
            got += _recv_exact(sock, MSG - len(got))
        t1 = clock()
        if got != msg:
            return rtts, [f"echo returned different bytes at message {i}"], True
        rtts.append((t1 - t0) / 1000)
        if i % 64 == 0 and time.perf_counter() > deadline:
            break
    return rtts, [], False


def _pingpong_many(socks: list[socket.socket], per_conn: int,
                   duration: float) -> tuple[list[float], list[str], bool]:
    sel = selectors.DefaultSelector()
    clock = time.perf_counter_ns
    state: dict[int, list[Any]] = {}  # fd -> [sock, index, sent_at, received bytes]
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    rtts: list[float] = []
    errors: list[str] = []
    for sock in socks:
        state[sock.fileno()] = [sock, 0, clock(), b""]
        sock.send(_message(0))
    active = len(socks)
    deadline = time.perf_counter() + duration
    for _ in range(per_conn * len(socks) * 4 + 1000):
        if active == 0 or time.perf_counter() > deadline:
            break
        for key, _ev in sel.select(timeout=1.0):
            st = state[key.fd]
            sock = st[0]
            try:
                part = sock.recv(MSG - len(st[3]))
            except BlockingIOError:
                continue
            except OSError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                sel.unregister(sock)
                active -= 1
                continue
            if not part:
                errors.append("connection closed by the peer during ping-pong")
                sel.unregister(sock)
                active -= 1
                continue
            st[3] += part
            if len(st[3]) < MSG:
                continue
            now = clock()
            if st[3] != _message(st[1]):
                sel.close()
                return rtts, [f"echo returned different bytes at message {st[1]}"], True
            rtts.append((now - st[2]) / 1000)
            st[1] += 1
            st[3] = b""
            if st[1] >= per_conn:
                sel.unregister(sock)
                active -= 1
                continue
            st[2] = clock()
            sock.send(_message(st[1]))  # 64 bytes into an empty send buffer: never partial
    sel.close()
    return rtts, errors, False


# --- short connections ------------------------------------------------------------------


def shortconn(port: int, concurrency: int, duration: float, max_count: int) -> dict[str, Any]:
    if concurrency == 1:
        return _short_sequential(port, duration, max_count)
    return _short_concurrent(port, concurrency, duration, max_count)


def _short_sequential(port: int, duration: float, max_count: int) -> dict[str, Any]:
    done = 0
    errors: list[str] = []
    corrupt = False
    start = time.perf_counter()
    deadline = start + duration
    for _ in range(max_count):
        if time.perf_counter() >= deadline:
            break
        try:
            sock = socket.create_connection((HOST, port), timeout=10)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(b"x")
                got = sock.recv(1)
            finally:
                sock.close()
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        if got != b"x":
            corrupt = True
            errors.append(f"expected the echo of b'x', got {got!r}")
            continue
        done += 1
    elapsed = time.perf_counter() - start
    return {"count": done, "seconds": elapsed, "per_s": done / elapsed,
            "errors": errors[:10], "n_errors": len(errors), "corrupt": corrupt}


def _short_concurrent(port: int, concurrency: int, duration: float,
                      max_count: int) -> dict[str, Any]:
    sel = selectors.DefaultSelector()
    errors: list[str] = []
    corrupt = False
    started = 0
    done = 0
    start = time.perf_counter()
    deadline = start + duration

    def launch() -> None:
        nonlocal started
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rc = sock.connect_ex((HOST, port))
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            errors.append(f"connect: {errno.errorcode.get(rc, rc)}")
            return
        started += 1
        sel.register(sock, selectors.EVENT_WRITE, "connecting")

    def finish(sock: socket.socket) -> None:
        sel.unregister(sock)
        sock.close()

    for _ in range(concurrency):
        launch()
    hard_deadline = deadline + 15.0  # in-flight connections get this long to finish
    for _ in range(max_count * 4 + 1000):
        if not sel.get_map() or time.perf_counter() > hard_deadline:
            break
        for key, _ev in sel.select(timeout=1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if key.data == "connecting":
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, errno.errorcode.get(err, str(err)))
                    sock.send(b"x")
                    sel.modify(sock, selectors.EVENT_READ, "reading")
                    continue
                got = sock.recv(1)
            except BlockingIOError:
                continue
            except OSError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                finish(sock)
            else:
                finish(sock)
                if got == b"x":
                    done += 1
                else:
                    corrupt = corrupt or bool(got)
                    errors.append(f"expected the echo of b'x', got {got!r}")
            if time.perf_counter() < deadline and started < max_count:
                launch()
    elapsed = time.perf_counter() - start
    for key in list(sel.get_map().values()):
        errors.append("connection did not finish in time")
        finish(key.fileobj)  # type: ignore[arg-type]
    sel.close()
    return {"count": done, "seconds": elapsed, "per_s": done / elapsed,
            "errors": errors[:10], "n_errors": len(errors), "corrupt": corrupt}


# --- idle connections -------------------------------------------------------------------


def idle_open(port: int, n: int, in_flight: int, timeout: float) -> dict[str, Any]:
    """Open ``n`` connections, each proven live by one echoed byte, and keep them open."""
    idle_close()
    sel = selectors.DefaultSelector()
    errors: list[str] = []
    corrupt = False
    launched = 0
    start = time.perf_counter()
    deadline = start + timeout

    def launch() -> None:
        nonlocal launched
        launched += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Spread the sources over 127.0.0.2-254, IDLE_PER_SOURCE each: the relay caps
        # visitors per source address (guard.py, 256), a real crowd comes from many hosts.
        sock.bind((f"127.0.0.{2 + (launched - 1) // IDLE_PER_SOURCE % 253}", 0))
        sock.setblocking(False)
        rc = sock.connect_ex((HOST, port))
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            errors.append(f"connect: {errno.errorcode.get(rc, rc)}")
            return
        sel.register(sock, selectors.EVENT_WRITE, "connecting")

    for _ in range(min(n, in_flight)):
        launch()
    for _ in range(n * 4 + 1000):
        if not sel.get_map() or time.perf_counter() > deadline:
            break
        for key, _ev in sel.select(timeout=1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if key.data == "connecting":
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, errno.errorcode.get(err, str(err)))
                    sock.send(b"i")
                    sel.modify(sock, selectors.EVENT_READ, "reading")
                    continue
                got = sock.recv(1)
            except BlockingIOError:
                continue
            except OSError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                sel.unregister(sock)
                sock.close()
            else:
                sel.unregister(sock)
                if got == b"i":
                    _idle.append(sock)
                else:
                    corrupt = corrupt or bool(got)
                    errors.append(f"expected the echo of b'i', got {got!r}")
                    sock.close()
            if launched < n:
                launch()
    for key in list(sel.get_map().values()):
        errors.append("connection not live in time")
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    return {"requested": n, "held": len(_idle), "seconds": time.perf_counter() - start,
            "errors": errors[:10], "n_errors": len(errors), "corrupt": corrupt}


def idle_check() -> dict[str, Any]:
    """After the measurement: how many of the held connections still echo."""
    alive = 0
    for sock in _idle:
        try:
            sock.setblocking(True)
            sock.settimeout(10)
            sock.sendall(b"j")
            if sock.recv(1) == b"j":
                alive += 1
        except OSError:
            pass
    return {"alive": alive, "held": len(_idle)}


def idle_close() -> dict[str, Any]:
    n = len(_idle)
    for sock in _idle:
        sock.close()
    _idle.clear()
    return {"closed": n}


# --- worker -----------------------------------------------------------------------------

JOBS: dict[str, Callable[..., dict[str, Any]]] = {
    "bulk": bulk,
    "pingpong": pingpong,
    "shortconn": shortconn,
    "idle_open": idle_open,
    "idle_check": idle_check,
    "idle_close": idle_close,
}


def prepare(streams: list[tuple[int, int]]) -> dict[str, Any]:
    start = time.perf_counter()
    for seed, size in streams:
        _expected(seed, size)
    return {"seconds": time.perf_counter() - start}


JOBS["prepare"] = prepare


def worker_main(conn: Connection) -> None:
    """Serve jobs until told to quit or the pipe closes."""
    for _ in range(1_000_000):
        try:
            job = conn.recv()
        except EOFError:
            break
        if job is None:
            break
        name, kwargs = job
        try:
            result = JOBS[name](**kwargs)
        except Exception as exc:
            result = {"errors": [f"{type(exc).__name__}: {exc}"], "n_errors": 1,
                      "corrupt": False, "traceback": traceback.format_exc()}
        conn.send(result)
    idle_close()
