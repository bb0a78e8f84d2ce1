"""The app's server as a service manager runs it: `synthbrain app` is the server process, so SIGTERM
stops it with nothing left listening and no temp files; plain `streamlit run app.py` (only the
checked-in .streamlit/config.toml) listens on 127.0.0.1 alone, contacts nothing and refuses a
WebSocket whose Host header is a stranger's (DNS rebinding)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(proc: subprocess.Popen, port: int, log: Path, limit: float = 180.0) -> None:
    """Until /_stcore/health answers (``limit`` only guards against a hang on a loaded machine)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"no health answer:\n{log.read_text()}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} writes them) of sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local.rsplit(":", 1)[0])
    return found


def start(cmd: list[str], tmp_path: Path, cwd: Path, **extra_env: str) -> tuple[subprocess.Popen, Path, Path]:
    """``cmd`` in a session (process group) of its own, with a private TMPDIR and a log file."""
    tmp, log = tmp_path / "tmp", tmp_path / "server.log"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTHBRAIN_", "STREAMLIT_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TMPDIR=str(tmp), SYNTHBRAIN_DEVICE="cpu", **extra_env)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, tmp, log


def websocket_status(port: int, host: str, origin: str) -> str:
    """The status line the server answers a WebSocket upgrade of /_stcore/stream with."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: streamlit\r\n\r\n").encode())
        return s.recv(4096).split(b"\r\n", 1)[0].decode()


def test_sigterm_to_synthbrain_app_stops_the_server_and_leaves_nothing(tmp_path):
    port = free_port()
    proc, tmp, log = start([sys.executable, "-m", "synthbrain", "app", "--port", str(port)], tmp_path,
                           cwd=tmp_path)
    try:
        wait_for_health(proc, port, log)
        assert listening(port) == ["0100007F"]  # 127.0.0.1 only
        proc.send_signal(signal.SIGTERM)  # to the `synthbrain app` process, as systemd would
        proc.wait(timeout=60)  # a hang guard; the time it takes is in benchmarks/results.md
        assert not group_alive(proc.pid), "a process of the app's group outlived SIGTERM (an orphaned server)"
        assert listening(port) == []
        assert not list(tmp.iterdir()), "temp files left behind"
        assert f"SynthBrain app on http://127.0.0.1:{port}" in log.read_text()
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_plain_streamlit_run_is_local_contacts_nothing_and_refuses_strange_hosts(tmp_path):
    port = free_port()
    # only the port on the command line: everything else comes from .streamlit/config.toml
    proc, _, log = start([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port)],
                         tmp_path, cwd=ROOT)
    try:
        wait_for_health(proc, port, log)
        assert listening(port) == ["0100007F"], "listens beyond 127.0.0.1"
        text = log.read_text()
        assert f"URL: http://127.0.0.1:{port}" in text
        # no "Network URL" (found by a UDP connect to 8.8.8.8) and no "External URL" (an HTTP request
        # to checkip.amazonaws.com): with an address set, Streamlit looks up neither
        assert "Network URL" not in text and "External URL" not in text
        def upgrade(host: str, origin: str) -> str:
            return websocket_status(port, f"{host}:{port}", f"http://{origin}:{port}").split(" ", 1)[1]

        assert upgrade("127.0.0.1", "127.0.0.1") == "101 Switching Protocols"
        assert upgrade("localhost", "localhost") == "101 Switching Protocols"
        # a page on a rebinding name (its Host and Origin agree) gets no session
        assert upgrade("rebind.example", "rebind.example") == "403 Forbidden"
        assert upgrade("rebind.example", "127.0.0.1") == "403 Forbidden"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()



def test_the_readmes_allowed_hosts_let_the_public_name_in(tmp_path):
    """The service unit's STREAMLIT_SERVER_ALLOWED_HOSTS, exactly as the README writes it: the proxy's
    public name (its Host header) gets a session, a stranger's does not."""
    (value,) = re.findall(r'^Environment="STREAMLIT_SERVER_ALLOWED_HOSTS=([^"]+)"$',
                          (ROOT / "README.md").read_text(), flags=re.M)
    assert value.split()[0] == "synthbrain.example.org"
    port = free_port()
    proc, _, log = start([sys.executable, "-m", "synthbrain", "app", "--port", str(port)], tmp_path, cwd=tmp_path,
                         STREAMLIT_SERVER_ALLOWED_HOSTS=value)
    try:
        wait_for_health(proc, port, log)
        # behind the proxy (proxy_set_header Host $host): the public name, no port, the page's https origin
        assert websocket_status(port, "synthbrain.example.org", "https://synthbrain.example.org") \
            == "HTTP/1.1 101 Switching Protocols"
        assert websocket_status(port, f"localhost:{port}", f"http://localhost:{port}") \
            == "HTTP/1.1 101 Switching Protocols"
        assert websocket_status(port, "rebind.example", "https://rebind.example").split(" ", 1)[1] == "403 Forbidden"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
