"""Real servers for the cache tests, and the ``backend`` fixture over the registry.

* ``redis_server`` (session) and ``redis_factory`` (per test, for fault tests):
  the real ``redis-server`` binary on a free 127.0.0.1 port, in a temp dir.
* ``s3_server`` (session) and ``s3_factory`` (per test): moto's S3 server in server
  mode as a subprocess on a free 127.0.0.1 port, with a bucket.
* ``backend`` / ``backend_spec``: one param per registered scheme (plus a tiered
  cache), each a fresh, empty store.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from llmprod.cache import CacheBackend, TieredCache, open_cache, registered_schemes
from llmprod.testing import BackendSpec

START_TIMEOUT_S = 30.0
S3_KEY = "testing"
S3_SECRET = "testing"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip, or fail where CI sets ``LLMPROD_REQUIRE_SERVICES=1``.

    In CI a missing service or package is a failure, not a silent skip.
    """
    if os.environ.get("LLMPROD_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (LLMPROD_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(
    check: Callable[[], bool], proc: subprocess.Popen[bytes], what: str
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting")
        if check():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not start within {START_TIMEOUT_S}s")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class RedisServer:
    """A real ``redis-server`` process that a test can kill and restart.

    Args:
        workdir: where the server keeps its files and log.
    """

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            skip_or_fail("redis-server not installed: apt-get install -y redis-server")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        for attempt in range(5):
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--dir", str(self.workdir),
                    "--save", "",
                    "--appendonly", "no",
                    "--protected-mode", "no",
                    "--logfile", str(self.workdir / "redis.log"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                _wait_for(self._answers, self.proc, "redis-server")
                return
            except RuntimeError:
                _stop(self.proc)
                if attempt == 4:
                    raise
                time.sleep(0.2)  # the port may still be held; try it again

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def freeze(self) -> None:
        """SIGSTOP the server: connections stay open but nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT a frozen server."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Start the server again on the same port (after :meth:`kill`)."""
        _stop(self.proc)
        self.start()

    def stop(self) -> None:
        """Stop the server if it runs (thawing it first if frozen)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        _stop(self.proc)


class S3Server:
    """moto's S3 server in server mode, as a subprocess a test can kill.

    Args:
        workdir: where its log goes.
    """

    def __init__(self, workdir: Path) -> None:
        if importlib.util.find_spec("moto") is None or (
            importlib.util.find_spec("s3fs") is None
        ):
            skip_or_fail(
                "moto or s3fs not installed: pip install s3fs 'moto[s3,server]' "
                "flask flask-cors (in one command)"
            )
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self) -> dict[str, Any]:
        """The ``open_cache`` options that reach this endpoint."""
        return {"endpoint_url": self.endpoint_url, "key": S3_KEY, "secret": S3_SECRET}

    def start(self) -> None:
        """Start the server and wait until it answers HTTP."""
        log = open(self.workdir / "moto.log", "ab")  # noqa: SIM115
        env = dict(
            os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        _wait_for(self._answers, self.proc, "moto S3 server")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                return True
        except OSError:
            return False

    def create_bucket(self, name: str) -> None:
        """Create a bucket (plain HTTP PUT; us-east-1 needs no body)."""
        req = urllib.request.Request(f"{self.endpoint_url}/{name}", method="PUT")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def kill(self) -> None:
        """SIGKILL the server."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Stop the server if it runs."""
        _stop(self.proc)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole session (never killed)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start private redis-servers that a test may kill; all stopped at the end."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}")
        server.workdir.mkdir()
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One moto S3 server for the whole session, with bucket ``llmprod``."""
    server = S3Server(tmp_path_factory.mktemp("moto"))
    server.start()
    server.create_bucket("llmprod")
    yield server
    server.stop()


@pytest.fixture
def s3_factory(tmp_path: Path) -> Iterator[Callable[[], S3Server]]:
    """Start private moto servers (bucket ``llmprod``) that a test may kill."""
    servers: list[S3Server] = []

    def make() -> S3Server:
        server = S3Server(tmp_path)
        servers.append(server)
        server.start()
        server.create_bucket("llmprod")
        return server

    yield make
    for server in servers:
        server.stop()


# Each param builds a BackendSpec for a fresh, empty store of one scheme. The
# spec is None where another process cannot reach the store (in-process memory).
SpecMaker = Callable[[pytest.FixtureRequest, Path], "BackendSpec | None"]


def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> BackendSpec | None:
    return None


def _diskcache(request: pytest.FixtureRequest, tmp_path: Path) -> BackendSpec:
    return BackendSpec(f"diskcache://{tmp_path / 'dc'}")


def _redis(request: pytest.FixtureRequest, tmp_path: Path) -> BackendSpec:
    server: RedisServer = request.getfixturevalue("redis_server")
    # A namespace per test keeps tests on the shared server apart.
    return BackendSpec(server.url, {"namespace": f"t{uuid.uuid4().hex}:"})


def _s3(request: pytest.FixtureRequest, tmp_path: Path) -> BackendSpec:
    server: S3Server = request.getfixturevalue("s3_server")
    return BackendSpec(f"s3://llmprod/{uuid.uuid4().hex}", server.options)


def _file(request: pytest.FixtureRequest, tmp_path: Path) -> BackendSpec:
    return BackendSpec(f"file://{tmp_path / 'files'}")


SPECS: dict[str, SpecMaker] = {
    "memory": _memory,
    "diskcache": _diskcache,
    "redis": _redis,
    "s3": _s3,
    "file": _file,
}
# Schemes that only differ from one above by transport or spelling.
ALIASES = {"rediss": "redis (TLS)", "s3a": "s3"}
# Opened in-process only: fsspec's memory filesystem is per process.
IN_PROCESS_URLS = {
    "memory": "memory://?max_bytes=134217728",
    "fsspec+memory": "fsspec+memory://",
}
MARKS = {"redis": [pytest.mark.redis], "s3": [pytest.mark.s3]}


def _params() -> list[Any]:
    params = []
    for scheme in registered_schemes():
        if scheme in ALIASES:
            continue
        params.append(pytest.param(scheme, id=scheme, marks=MARKS.get(scheme, [])))
    params.append(pytest.param("tiered", id="tiered(memory,diskcache)"))
    return params


@pytest.fixture(params=_params())
def backend_kind(request: pytest.FixtureRequest) -> str:
    """The scheme under test."""
    return str(request.param)


@pytest.fixture
def backend_spec(
    backend_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> BackendSpec | None:
    """How another process reaches the store under test (None: it cannot)."""
    if backend_kind in ("memory", "fsspec+memory", "tiered"):
        return None
    maker = SPECS.get(backend_kind)
    if maker is None:
        pytest.fail(f"registered scheme {backend_kind!r} has no fixture in SPECS")
    return maker(request, tmp_path)


@pytest.fixture
def backend(
    backend_kind: str, backend_spec: BackendSpec | None, tmp_path: Path
) -> Iterator[CacheBackend]:
    """A fresh, empty backend of each registered kind; closed afterwards."""
    cache: CacheBackend
    if backend_kind == "tiered":
        cache = TieredCache(
            [
                open_cache(IN_PROCESS_URLS["memory"]),
                open_cache(f"diskcache://{tmp_path / 'tier-dc'}"),
            ]
        )
    elif backend_spec is None:
        url = IN_PROCESS_URLS[backend_kind]
        if backend_kind == "fsspec+memory":
            url += uuid.uuid4().hex
        cache = open_cache(url)
    else:
        cache = backend_spec.open()
    yield cache
    cache.close()
