"""Read what a page sent through Streamlit's media files (``st.image``, ``st.download_button`` with
bytes, or with a callable: ``deferred``) under AppTest: each run gets a fresh in-memory store, which
``record_media`` keeps a handle on. A test module wraps it in a fixture (see tests/app/test_learn.py)."""

from __future__ import annotations


class MediaFiles:
    def __init__(self) -> None:
        self.stores: list = []
        self.managers: list = []

    def deferred(self, button) -> tuple[str, bytes]:
        """(file name, bytes) of a download button whose data is a callable, made as a click would
        make them (Streamlit runs the callable when the browser asks for the file)."""
        file_id = button.proto.deferred_file_id
        for mgr in reversed(self.managers):
            entry = mgr._deferred_callables.get(file_id)
            if entry is not None:
                url = mgr.execute_deferred(file_id)
                return entry["filename"], self(url)
        raise KeyError(f"no deferred download {file_id}")

    def __call__(self, url: str) -> bytes:
        """The bytes behind a media URL of the latest run that has it."""
        from streamlit.runtime.media_file_storage import MediaFileStorageError

        name = url.rsplit("/", 1)[-1]
        for store in reversed(self.stores):
            try:
                return store.get_file(name).content
            except MediaFileStorageError:
                continue
        raise KeyError(f"no media file {url}")


def record_media(monkeypatch) -> MediaFiles:
    """From now on (until ``monkeypatch`` undoes it), every AppTest run's media store is kept."""
    import streamlit.testing.v1.app_test as app_test

    files = MediaFiles()
    base = app_test.MemoryMediaFileStorage

    class Recording(base):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            files.stores.append(self)

    manager = app_test.MediaFileManager

    class RecordingManager(manager):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            files.managers.append(self)

    monkeypatch.setattr(app_test, "MemoryMediaFileStorage", Recording)
    monkeypatch.setattr(app_test, "MediaFileManager", RecordingManager)
    return files
