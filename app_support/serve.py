"""``python -m app_support.serve app.py [streamlit run options]``: ``streamlit run`` with the bounded
upload manager (``uploads.py``) in place before the server is built, so uploads are bounded from the
first request. ``synthbrain app`` execs this."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from streamlit.web import cli
    from streamlit.web.server import server

    from app_support.uploads import BoundedUploadedFileManager

    # Server() builds its upload manager from this module global, once, at start-up
    server.MemoryUploadedFileManager = BoundedUploadedFileManager
    cli.main(["run", *argv], prog_name="streamlit")


if __name__ == "__main__":
    main(sys.argv[1:])
