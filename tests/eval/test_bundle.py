"""ensure_eval_bundle: local folders, and the download from a local HTTP server (zip of a handmade bundle)."""
from __future__ import annotations

import io
import threading
import zipfile
from pathlib import Path

import pytest

from nanotrain import paths
from nanotrain.errors import UserError
from nanotrain.eval.core import BUNDLE_ENV_VAR, ensure_eval_bundle, load_tasks
from tests.eval.eval_standins import handmade_rows, write_bundle
from tests.local_http import LocalHTTPServer, QuietHandler


def zip_of(folder: Path, top: str = "eval_bundle") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"{top}/{p.relative_to(folder)}")
    return buf.getvalue()


class Server(LocalHTTPServer):
    """Serves fixed bytes at /eval_bundle.zip on 127.0.0.1, counting the requests."""

    def __init__(self, payload: bytes):
        self.payload, self.hits = payload, 0
        outer = self

        class Handler(QuietHandler):
            def do_GET(self):
                outer.hits += 1
                if self.path != "/eval_bundle.zip":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                self.wfile.write(outer.payload)

        super().__init__(Handler)
        self.url = self.address("/eval_bundle.zip")


@pytest.fixture
def handmade(tmp_path) -> Path:
    tasks, rows = handmade_rows()
    return write_bundle(tmp_path / "src" / "eval_bundle", tasks, rows)


def test_download_once_with_concurrent_callers(tmp_path, handmade, monkeypatch):
    monkeypatch.delenv(BUNDLE_ENV_VAR, raising=False)
    base = tmp_path / "base"
    with Server(zip_of(handmade)) as server:
        results: list[Path] = []
        threads = [threading.Thread(target=lambda: results.append(ensure_eval_bundle(base, url=server.url)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert server.hits == 1  # the lock made the other callers wait and reuse the download
        assert results == [paths.eval_bundle_dir(base)] * 4
        assert ensure_eval_bundle(base, url=server.url) == paths.eval_bundle_dir(base) and server.hits == 1
    target = paths.eval_bundle_dir(base)
    assert [t.label for t in load_tasks(target)] == ["mc", "schema", "lm", "lm_space"]
    mc = "eval_data/cat_a/mc.jsonl"
    assert (target / mc).read_bytes() == (handmade / mc).read_bytes()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".eval_bundle_tmp_")]  # no leftovers


def test_unreachable_or_bad_archive_is_a_user_error(tmp_path, handmade, monkeypatch):
    monkeypatch.delenv(BUNDLE_ENV_VAR, raising=False)
    with Server(b"this is not a zip") as server:
        with pytest.raises(UserError, match="not a zip"):
            ensure_eval_bundle(tmp_path / "a", url=server.url)
        with pytest.raises(UserError, match="could not download.*--bundle-dir"):
            ensure_eval_bundle(tmp_path / "a", url=server.url.replace("eval_bundle.zip", "missing.zip"))
    with Server(zip_of(handmade / "eval_data")) as server:  # a zip without core.yaml
        with pytest.raises(UserError, match="no core.yaml"):
            ensure_eval_bundle(tmp_path / "b", url=server.url)
    assert not paths.eval_bundle_dir(tmp_path / "a").exists() and not paths.eval_bundle_dir(tmp_path / "b").exists()


def test_local_folder_overrides(tmp_path, handmade, monkeypatch):
    monkeypatch.delenv(BUNDLE_ENV_VAR, raising=False)
    nowhere = "http://127.0.0.1:9/never.zip"  # never contacted: the folder is used as is
    assert ensure_eval_bundle(tmp_path, url=nowhere, bundle_dir=handmade) == handmade
    monkeypatch.setenv(BUNDLE_ENV_VAR, str(handmade))
    assert ensure_eval_bundle(tmp_path, url=nowhere) == handmade
    with pytest.raises(UserError, match="not a CORE eval bundle"):
        ensure_eval_bundle(tmp_path, url=nowhere, bundle_dir=tmp_path / "empty")
