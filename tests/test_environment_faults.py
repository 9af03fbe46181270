"""The environment misbehaves: existing outputs, folders given for files, empty datasets, umasks,
silent download servers, W&B without a login or network, read-only data folders. Each command
exits 2 with a message naming the problem and what to do, and leaves everything else as it was
(issue: user data is sacred). None of these depends on float results of training."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import stat
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from metacl.cli import main
from metacl.core import atomic
from metacl.core.errors import ConfigError, DataError
from metacl.core.tracking import TrackingConfig, check_backends
from metacl.core.tracking import wandb as wandb_module
from metacl.meta.data import cache as cache_module
from metacl.meta.data import download as download_module
from metacl.meta.data import omniglot
from metacl.meta.data.download import download
from metacl.scenes.h5 import SceneWriter, load_scenes, partial_path
from tests.mastery_helpers import tiny, write_scenes
from tests.test_meta_data import omniglot_zip

MASTERY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mastery" / "quick.yaml"
UNREACHABLE = "http://127.0.0.1:9/"


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """(md5, mtime, mode) of every file under `folder`: proves a command changed nothing."""
    return {
        str(p.relative_to(folder)): (hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def scenes_args(out: Path | str, *extra: str, n: int = 2) -> list[str]:
    return ["data", "scenes", "--num-images", str(n), "--out", str(out), "--workers", "1", "--quiet", *extra]


# ------------------------------------------------------------- 1. existing outputs, folders
def test_scenes_refuses_to_replace_an_existing_file_without_overwrite(tmp_path, capsys):
    existing = write_scenes(tmp_path / "scenes.h5", 400)
    before = snapshot(tmp_path)
    assert main(scenes_args(existing, n=20)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {existing} already exists (400 images); pass --overwrite")
    assert snapshot(tmp_path) == before  # the 400 images are intact, no .partial was started

    assert main(scenes_args(existing, "--overwrite")) == 0
    assert len(load_scenes(existing)) == 2 and not partial_path(existing).exists()
    capsys.readouterr()
    after = snapshot(tmp_path)
    assert main(scenes_args(existing)) == 0  # the very same scenes: nothing to do, nothing touched
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot(tmp_path) == after


def test_an_interrupted_generation_still_resumes_from_its_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "scenes.h5"
    real_write, starts = SceneWriter.write, []

    def write_then_die(self, start, *arrays):
        real_write(self, start, *arrays)
        starts.append(start)
        raise KeyboardInterrupt

    monkeypatch.setattr(SceneWriter, "write", write_then_die)
    assert main(scenes_args(out, "--batch-size", "2", n=4)) == 130
    assert partial_path(out).exists() and not out.exists()

    def record(self, start, *arrays):
        starts.append(start)
        real_write(self, start, *arrays)

    monkeypatch.setattr(SceneWriter, "write", record)
    assert main(scenes_args(out, "--batch-size", "2", n=4)) == 0  # no --overwrite needed
    assert starts == [0, 2]  # resumed after the first batch instead of starting again
    assert len(load_scenes(out)) == 4 and not partial_path(out).exists()


@pytest.mark.parametrize("make_folder", [True, False])
def test_scenes_out_naming_a_folder_is_refused_leaving_nothing(make_folder, tmp_path, capsys):
    target = tmp_path / "results"
    if make_folder:
        target.mkdir()
    out = f"{target}/" if not make_folder else str(target)
    assert main(scenes_args(out)) == 2
    err = capsys.readouterr().err
    assert f"error: --out {out} is a folder; give a file name, e.g. {target / 'scenes.h5'}" in err
    assert list(tmp_path.rglob("*")) == ([target] if make_folder else [])  # no .partial anywhere


def test_preview_refuses_existing_files_folders_and_its_own_input(tmp_path, capsys):
    scenes = write_scenes(tmp_path / "scenes.h5", 8)
    png = tmp_path / "sheet.png"
    png.write_bytes(b"my hand-made figure")
    (tmp_path / "folder").mkdir()
    before = snapshot(tmp_path)
    cases = [
        ([str(png)], f"error: {png} already exists; pass --overwrite to replace it"),
        ([str(tmp_path / "folder")], "is a folder; give a file name, e.g."),
        ([str(scenes), "--overwrite"], "is the scenes file itself"),
    ]
    for out, message in cases:
        assert main(["data", "preview", str(scenes), "--n", "2", "--out", *out]) == 2
        assert message in capsys.readouterr().err
        assert snapshot(tmp_path) == before
    assert main(["data", "preview", str(scenes), "--n", "2", "--out", str(png), "--overwrite"]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------- 2. a scenes file without images
@pytest.fixture
def empty_scenes(tmp_path) -> Path:
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f["X"] = np.zeros((0, 16, 16, 3), np.uint8)
        f["D"] = np.zeros((0, 5, 3), np.uint8)
        f["y"] = np.zeros((0, 30), np.uint8)
    return path


def test_a_scenes_file_without_images_is_a_data_error(empty_scenes, tmp_path, capsys):
    with pytest.raises(DataError, match="has no images"):
        load_scenes(empty_scenes)
    before = snapshot(tmp_path)
    assert main(["data", "preview", str(empty_scenes), "--out", str(tmp_path / "p.png")]) == 2
    assert f"error: {empty_scenes}: has no images" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_a_mastery_run_on_a_scenes_file_without_images_is_refused(empty_scenes, tmp_path, capsys):
    before = snapshot(tmp_path)
    out = tmp_path / "runs"
    assert main(["mastery", "run", str(MASTERY_CONFIG), *tiny(empty_scenes, out)]) == 2
    assert f"error: {empty_scenes}: has no images" in capsys.readouterr().err
    assert list(out.iterdir()) == [] and snapshot(tmp_path) == before


# ------------------------------------------------------------- 3. the umask
@pytest.fixture
def umask():
    """Set the umask for one test; restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(mask, expected, umask, tmp_path):
    umask(mask)
    atomic.write_text(tmp_path / "status.json", "{}")
    with atomic.atomic_path(tmp_path / "table.bin") as tmp:
        tmp.write_bytes(b"by name")
    with atomic.atomic_path(tmp_path / "recreated.bin") as tmp:  # a library that makes its own file
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    old = tmp_path / "old.txt"
    old.write_text("0600 before")
    old.chmod(0o600)
    atomic.write_text(old, "replaced")
    images = torch.zeros(1, 1, 1, 2, 2, dtype=torch.uint8)
    cache_module.save_cache(tmp_path / "cache.pt", {"k": 1}, images, ["a"])
    for name in ("status.json", "table.bin", "recreated.bin", "old.txt", "cache.pt"):
        assert mode(tmp_path / name) == expected, name
    assert atomic.new_file_mode() == expected
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_downloads_honour_the_umask(umask, tmp_path):
    source = tmp_path / "source.zip"
    source.write_bytes(b"zip bytes")
    umask(0o022)
    assert mode(download(source.as_uri(), tmp_path / "a" / "x.zip", quiet=True)) == 0o644
    umask(0o077)
    assert mode(download(source.as_uri(), tmp_path / "b" / "x.zip", quiet=True)) == 0o600


# ------------------------------------------------------------- 4. download time limits
@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


def test_a_silent_server_fails_within_the_timeout_with_a_clear_message(silent_server, tmp_path):
    url = f"http://127.0.0.1:{silent_server}/images_background.zip"
    start = time.monotonic()
    with pytest.raises(DataError) as error:
        download(url, tmp_path / "x.zip", quiet=True, timeout_s=1)
    assert time.monotonic() - start < 4
    message = str(error.value)
    assert f"could not download {url}: no answer from the server within the 1 s download timeout" in message
    assert "--timeout SECONDS" in message and "METACL_DOWNLOAD_TIMEOUT=SECONDS" in message
    assert list(tmp_path.iterdir()) == []


def test_connecting_has_its_own_short_limit(silent_server, tmp_path, monkeypatch):
    """A TLS handshake that never completes counts against the connect limit, per attempt."""
    monkeypatch.setattr(download_module, "CONNECT_TIMEOUT_S", 0.3)
    start = time.monotonic()
    with pytest.raises(DataError, match="download timeout .*3 attempt"):
        download(f"https://127.0.0.1:{silent_server}/x.zip", tmp_path / "x.zip", quiet=True, timeout_s=20, backoff_s=0)
    assert time.monotonic() - start < 5
    assert download_module.CONNECT_TIMEOUT_S < download_module.DEFAULT_TIMEOUT_S <= 30


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Sends 4 chunks 0.4 s apart: slower in total than the timeout, never silent for as long."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "4096")
        self.end_headers()
        for _ in range(4):
            time.sleep(0.4)
            self.wfile.write(b"x" * 1024)
            self.wfile.flush()

    def log_message(self, *args):
        pass


def test_a_slow_download_that_keeps_receiving_is_not_cut_off(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        dest = download(f"http://127.0.0.1:{server.server_address[1]}/f", tmp_path / "f", quiet=True, timeout_s=1)
    finally:
        server.shutdown()
        server.server_close()
    assert dest.read_bytes() == b"x" * 4096


@pytest.mark.parametrize("how", ["flag", "env"])
def test_omniglot_timeout_from_the_flag_or_the_environment(how, silent_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(omniglot.URL_PREFIX_ENV, f"http://127.0.0.1:{silent_server}/")
    monkeypatch.delenv(download_module.TIMEOUT_ENV, raising=False)
    argv = ["data", "omniglot", "--data-dir", str(tmp_path), "--split", "background", "--quiet"]
    if how == "flag":
        argv += ["--timeout", "1"]
    else:
        monkeypatch.setenv(download_module.TIMEOUT_ENV, "1")
    start = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert (
        f"error: could not download http://127.0.0.1:{silent_server}/images_background.zip: no answer "
        "from the server within the 1 s download timeout"
    ) in err
    assert not list(tmp_path.rglob("*.zip")) and not list(tmp_path.rglob("*.part"))


def test_bad_timeouts_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(omniglot.URL_PREFIX_ENV, UNREACHABLE)
    monkeypatch.delenv(download_module.TIMEOUT_ENV, raising=False)
    assert download_module.download_timeout() == 30
    for value in ("0", "-1", "soon"):
        with pytest.raises(SystemExit) as exit_info:
            main(["data", "omniglot", "--data-dir", str(tmp_path), "--timeout", value])
        assert exit_info.value.code == 2
        assert "--timeout" in capsys.readouterr().err
    monkeypatch.setenv(download_module.TIMEOUT_ENV, "never")
    assert main(["data", "omniglot", "--data-dir", str(tmp_path)]) == 2
    assert "error: METACL_DOWNLOAD_TIMEOUT must be a positive number of seconds, got 'never'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- 5. W&B online
@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    for name in (
        "WANDB_API_KEY",
        "WANDB_IDENTITY_TOKEN_FILE",
        "WANDB_BASE_URL",
        "WANDB_MODE",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def online_run(tmp_path: Path, *extra: str) -> tuple[list[str], Path, Path]:
    scenes = write_scenes(tmp_path / "scenes.h5", 400)
    out = tmp_path / "runs"
    return (
        [
            "mastery",
            "run",
            str(MASTERY_CONFIG),
            *tiny(scenes, out, "tracking.backends=[wandb]", "tracking.wandb_mode=online", *extra),
        ],
        scenes,
        out,
    )


def test_wandb_online_without_an_api_key_is_refused_before_training(no_wandb_login, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wandb_module, "connect_problem", lambda *a, **k: pytest.fail("no key: no network check"))
    argv, _, out = online_run(tmp_path)
    before = snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: tracking.wandb_mode=online needs a W&B API key, and none was found" in err
    assert "WANDB_API_KEY" in err and "wandb login" in err
    assert "tracking.wandb_mode=offline (the default), which needs neither an API key nor a network" in err
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("wandb"))  # nothing ran
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("runs")} == before


def test_wandb_online_without_network_is_refused(no_wandb_login, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "metacl-test-not-a-real-key")
    checked = []
    monkeypatch.setattr(
        wandb_module, "connect_problem", lambda host, port, *a: checked.append((host, port)) or "timed out"
    )
    argv, _, out = online_run(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "error: tracking.wandb_mode=online cannot reach the W&B server api.wandb.ai:443 from this machine (timed out)"
    ) in err
    assert "offline (the default)" in err and "metacl-test-not-a-real-key" not in err
    assert checked == [("api.wandb.ai", 443)]
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("wandb"))


def test_wandb_login_sources_and_offline_needs_nothing(no_wandb_login, tmp_path, monkeypatch):
    monkeypatch.setattr(wandb_module, "connect_problem", lambda *a, **k: pytest.fail("offline: no check"))
    check_backends(TrackingConfig(backends=["wandb"]))  # offline is the default: no key, no network
    wandb_module.check_online("offline")
    with pytest.raises(ConfigError, match="needs a W&B API key"):
        check_backends(TrackingConfig(backends=["wandb"], wandb_mode="online"))
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login a password b\nmachine api.wandb.ai login user password k\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_module.has_api_key("api.wandb.ai") and not wandb_module.has_api_key("wandb.example.org")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org:8443")
    assert wandb_module.wandb_server() == ("wandb.example.org", 8443)
    assert wandb_module.first_hop()[:2] == ("wandb.example.org", 8443)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.org:3128")
    monkeypatch.setenv("https_proxy", "http://proxy.example.org:3128")
    assert wandb_module.first_hop()[:2] == ("proxy.example.org", 3128)  # W&B goes through it


def test_the_network_check_is_short_and_real(silent_server):
    assert wandb_module.connect_problem("127.0.0.1", silent_server, 1) is None
    start = time.monotonic()
    assert wandb_module.connect_problem("127.0.0.1", 9, 1)  # nothing listens: refused at once
    assert time.monotonic() - start < 2


# ------------------------------------------------------------- 6. read-only data folders
@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """A folder that cannot be written, as os.access sees it (tests run as root, whom chmod does
    not stop)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        inside = Path(path) == folder or folder in Path(path).parents
        return False if inside and mode & os.W_OK else real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return folder


def test_scenes_into_a_read_only_data_dir(read_only, tmp_path, capsys):
    before = snapshot(tmp_path)
    assert main(["data", "scenes", "--num-images", "2", "--data-dir", str(read_only), "--workers", "1", "--quiet"]) == 2
    assert (
        f"error: cannot write to {read_only / 'scenes'}: permission denied (the nearest existing "
        f"folder, {read_only}); choose a writable --data-dir"
    ) in capsys.readouterr().err
    assert snapshot(tmp_path) == before and list(read_only.iterdir()) == []


def test_scenes_write_refused_by_the_file_system(tmp_path, monkeypatch, capsys):
    """os.access may say yes (NFS root squash, ACLs) and the write still fail."""

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self.partial))

    monkeypatch.setattr(SceneWriter, "__enter__", refuse)
    out = tmp_path / "x.h5"
    assert main(scenes_args(out)) == 2
    assert (
        f"error: cannot write to {partial_path(out)}: permission denied; choose a writable --out"
        in capsys.readouterr().err
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_scenes_into_a_really_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(scenes_args(folder / "x.h5")) == 2
        assert f"error: cannot write to {folder}: permission denied" in capsys.readouterr().err
    finally:
        folder.chmod(0o755)


def test_omniglot_into_a_read_only_data_dir(read_only, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(omniglot.URL_PREFIX_ENV, UNREACHABLE)
    monkeypatch.setattr(omniglot, "download", lambda *a, **k: pytest.fail("no download"))
    assert main(["data", "omniglot", "--data-dir", str(read_only), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: cannot write to {read_only / 'omniglot'}: permission denied (the nearest existing "
        f"folder, {read_only}); Omniglot background is not in {read_only}, so it would be downloaded "
        "there; choose a writable --data-dir"
    ) in err
    assert list(read_only.iterdir()) == []

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert main(["data", "omniglot", "--data-dir", str(not_a_folder), "--quiet"]) == 2
    assert f"{not_a_folder} is a file, not a folder" in capsys.readouterr().err


def test_a_read_only_data_dir_holding_the_data_works(read_only, tmp_path, monkeypatch, capsys):
    """Shared, read-only Omniglot zips are used as they are; the cache goes to a writable place."""
    monkeypatch.setenv(omniglot.URL_PREFIX_ENV, UNREACHABLE)
    monkeypatch.setenv("METACL_DATA_DIR", str(tmp_path / "mine"))
    omniglot_zip(read_only / "images_evaluation.zip", "evaluation")
    before = snapshot(read_only)
    assert main(["data", "omniglot", "--data-dir", str(read_only), "--split", "evaluation", "--quiet"]) == 0
    assert "evaluation  28px: 7 classes" in capsys.readouterr().out
    assert snapshot(read_only) == before
    assert (tmp_path / "mine" / "omniglot" / "omniglot-evaluation-28.pt").is_file()


def test_download_into_an_unwritable_folder_is_not_retried(tmp_path, monkeypatch):
    def refuse(path, suffix=".tmp"):
        raise PermissionError(13, "Permission denied", str(Path(path).parent))

    monkeypatch.setattr(download_module, "temp_sibling", refuse)
    monkeypatch.setattr(download_module.time, "sleep", lambda s: pytest.fail("retried a local error"))
    with pytest.raises(
        DataError,
        match=r"cannot write to .*: permission denied; save x.zip there yourself "
        r"or choose a writable data folder \(--data-dir\)",
    ):
        download(UNREACHABLE + "x.zip", tmp_path / "x.zip", quiet=True)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_folders_the_kernel_refuses_even_to_root(tmp_path, monkeypatch, capsys):
    """sysfs takes no new files from anyone: the real errors, not simulated ones."""
    monkeypatch.setenv(omniglot.URL_PREFIX_ENV, UNREACHABLE)
    for argv in (
        ["data", "scenes", "--num-images", "2", "--workers", "1", "--quiet", "--data-dir", "/sys/metacl-test"],
        scenes_args("/sys/metacl-test.h5"),
        ["data", "omniglot", "--data-dir", "/sys/metacl-test", "--quiet"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot ") and "/sys" in err and "Traceback" not in err
        assert "choose a writable --" in err, err
    assert not Path("/sys/metacl-test").exists() and not Path("/sys/metacl-test.h5.partial").exists()
