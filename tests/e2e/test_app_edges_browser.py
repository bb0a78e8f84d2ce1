"""The app's edges against a real server, with a real browser session's cookie and XSRF token: PUTs to
made-up upload ids are refused and do not grow the server; an upload over the size limit is refused
without the server holding it; two browser sessions never see each other's uploads or samples."""

from __future__ import annotations

import os
import select
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from .e2e_helpers import app_context, open_app_page, wait_for_script

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LIMIT_MB = 50                                # .streamlit/config.toml's server.maxUploadSize
BOUNDARY = "----synthbrain-test-boundary"


def rss_mb(pid: int) -> float:
    """The server process's resident memory (MB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class Session:
    """What a browser session sends with an upload: its id (in the upload URL), cookie and XSRF token."""

    port: int
    session_id: str
    cookie: str
    xsrf: str

    def head(self, file_id: str, extra: str) -> bytes:
        return (f"PUT /_stcore/upload_file/{self.session_id}/{file_id} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Origin: http://127.0.0.1:{self.port}\r\nCookie: {self.cookie}\r\nX-Xsrftoken: {self.xsrf}\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nConnection: close\r\n{extra}\r\n").encode()

    def put(self, file_id: str, data: bytes | None = None, *, announce: int | None = None,
            over_by: int | None = None) -> int:
        """PUT one file as the browser does (multipart) and return the status code. ``announce``: send
        only a Content-Length header of that many bytes and wait for the answer; ``over_by``: stream a
        body (chunked, no length announced) that many bytes over what the server accepts."""
        part = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{file_id}"; filename="scan.nii.gz"\r\n'
                "Content-Type: application/gzip\r\n\r\n").encode()
        tail = f"\r\n--{BOUNDARY}--\r\n".encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=120) as s:
            if announce is not None:
                s.sendall(self.head(file_id, f"Content-Length: {announce}\r\n"))
            elif over_by is not None:
                # no length announced: the server counts the body as it comes and answers once it is
                # past the limit (plus Streamlit's 1 MB allowance for the multipart framing); stop
                # there, so the server has read all that was sent and closes cleanly
                s.sendall(self.head(file_id, "Transfer-Encoding: chunked\r\n"))
                block, sent, cap = os.urandom(256 * 1024), 0, (LIMIT_MB + 1) * 1024 * 1024 + over_by
                s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
                while sent < cap:
                    piece = block[:cap - sent]
                    s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                    sent += len(piece)
                assert select.select([s], [], [], 120)[0], "no answer to an over-limit upload"
            else:
                body = part + data + tail
                s.sendall(self.head(file_id, f"Content-Length: {len(body)}\r\n") + body)
            return int(s.recv(4096).split(b" ", 2)[1])


def upload_on_compare(page, url: str, path: Path) -> Session:
    """Upload ``path`` on the Compare page as a user does; the session's upload credentials."""
    open_app_page(page, url, "/compare")
    page.get_by_text("Upload a NIfTI").click()
    wait_for_script(page)
    with page.expect_request(lambda r: r.method == "PUT" and "/_stcore/upload_file/" in r.url) as put:
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(path))
    page.get_by_text(f"{path.name}: 80 x 112 x 80 voxels").wait_for()
    wait_for_script(page)
    request = put.value
    assert request.response().status == 204
    session_id = request.url.split("/_stcore/upload_file/", 1)[1].split("/")[0]
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
    return Session(int(url.rsplit(":", 1)[1]), session_id, cookie, request.headers["x-xsrftoken"])


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    from synthbrain.data.template import load_template
    from synthbrain.grids import DEMO
    from synthbrain.io import Volume, write_volume

    return write_volume(tmp_path_factory.mktemp("scans") / "only_in_a.nii.gz",
                        Volume(load_template(DEMO).t1 * 900.0, DEMO.affine), description="test scan")


@pytest.fixture(scope="module")
def user_a(browser, server, scan):
    """One browser session kept through the module's tests (in order): its page, after it uploaded
    ``scan`` on Compare, and its upload credentials."""
    context = app_context(browser)
    page = context.new_page()
    page.set_default_timeout(90_000)
    yield page, upload_on_compare(page, server.url, scan)
    context.close()


def test_made_up_upload_ids_are_refused_and_do_not_grow_the_server(user_a, server):
    _, session = user_a
    data = os.urandom(16 * 1024 * 1024)
    assert session.put(str(uuid.uuid4()), data) == 403  # once first: the server's buffers for a request
    before = rss_mb(server.pid)
    statuses = [session.put(str(uuid.uuid4()), data) for _ in range(6)]
    grown = rss_mb(server.pid) - before
    assert statuses == [403] * 6
    # Streamlit alone keeps every one of them (6 x 16 MB) until the session ends
    assert grown < 40, f"the server grew by {grown:.0f} MB after 6 refused uploads of 16 MB"


def test_an_upload_over_the_limit_is_refused_and_not_held(user_a, server):
    _, session = user_a
    before = rss_mb(server.pid)
    # announced: refused on its header, before any of the body is sent
    assert session.put(str(uuid.uuid4()), announce=(LIMIT_MB + 10) * 1024 * 1024) == 413
    # not announced (chunked): refused while it streams, once past the limit
    assert session.put(str(uuid.uuid4()), over_by=1024) == 413
    grown = rss_mb(server.pid) - before
    assert grown < 50, f"the server grew by {grown:.0f} MB refusing over-limit uploads"


def test_two_browser_sessions_never_see_each_others_uploads_or_samples(user_a, browser, server, scan):
    page, a = user_a
    # to Generate by the sidebar (the same session, unlike a new page load), and make a sample
    page.locator('[data-testid="stSidebarNav"]').get_by_text("Generate", exact=True).click()
    page.get_by_text("Generate a synthetic brain").wait_for()
    wait_for_script(page)
    page.get_by_role("button", name="Generate", exact=True).click()
    page.get_by_text("Sample 1", exact=True).wait_for(timeout=120_000)
    wait_for_script(page)
    assert "This session's samples (1)" in page.inner_text("body")

    other = app_context(browser)
    try:
        b_page = other.new_page()
        b_page.set_default_timeout(90_000)
        open_app_page(b_page, server.url)
        body = b_page.inner_text("body")
        assert "press Generate" in body and "Sample 1" not in body and "This session's samples" not in body
        b_page.locator('[data-testid="stSidebarNav"]').get_by_text("Compare", exact=True).click()
        b_page.get_by_text("Compare a scan with its reconstruction").wait_for()
        wait_for_script(b_page)
        b_page.get_by_text("Upload a NIfTI").click()
        wait_for_script(b_page)
        assert scan.name not in b_page.inner_text("body")
        assert b_page.locator('[data-testid="stFileUploaderFile"]').count() == 0
        assert b_page.get_by_role("button", name="Reconstruct").is_disabled()
        # nor can B's browser put a file into A's session (no id was issued to B for it)
        b_cookie = "; ".join(f"{c['name']}={c['value']}" for c in other.cookies())
        xsrf = next(c["value"] for c in other.cookies() if c["name"] == "_streamlit_xsrf")
        assert Session(a.port, a.session_id, b_cookie, xsrf).put(str(uuid.uuid4()), b"\x1f\x8b" * 100) == 403
    finally:
        other.close()
    assert "This session's samples (1)" in page.inner_text("body")  # A still has its own
