"""Meta-learning data: Omniglot preparation (synthetic zips in the official layout, and the real
data when present), downloads, caching, the folder dataset, class splits and augmentation."""

import hashlib
import http.server
import io
import logging
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from metacl.cli import main
from metacl.core.errors import ConfigError, DataError
from metacl.core.seeding import torch_generator
from metacl.meta.data import ClassImages, load_dataset, omniglot, random_resized_crop, split_classes
from metacl.meta.data import decode as decode_module
from metacl.meta.data.download import download

ALPHABETS = {"Tifinagh": 3, "Armenian": 2, "Bengali": 2}  # created in this (unsorted) order
DRAWINGS = 20
UNREACHABLE = "http://127.0.0.1:9/"  # nothing listens there: any download attempt fails


def drawing(seed: int) -> Image.Image:
    """A 105x105 1-bit image like Omniglot's: white background, a few black strokes."""
    rng = np.random.default_rng(seed)
    image = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        draw.line([tuple(int(v) for v in rng.integers(10, 95, 2)) for _ in range(3)], fill=0, width=4)
    return image


def omniglot_zip(path: Path, split: str) -> dict[str, bytes]:
    """A zip in the official layout, its members written in shuffled order; returns member bytes."""
    members = {}
    index = 0
    for alphabet, characters in ALPHABETS.items():
        for c in reversed(range(1, characters + 1)):
            index += 1
            for d in range(1, DRAWINGS + 1):
                buffer = io.BytesIO()
                drawing(index * 100 + d).save(buffer, format="PNG")
                name = f"images_{split}/{alphabet}/character{c:02d}/{index:04d}_{d:02d}.png"
                members[name] = buffer.getvalue()
    order = np.random.default_rng(0).permutation(len(members))
    names = list(members)
    with zipfile.ZipFile(path, "w") as archive:
        for i in order:
            archive.writestr(names[i], members[names[i]])
    return members


def expected_names() -> list[str]:
    return sorted(f"{a}/character{c:02d}" for a, n in ALPHABETS.items() for c in range(1, n + 1))


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file except metacl's caches."""
    return {
        str(p.relative_to(folder)): (hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and p.suffix != ".pt"
    }


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Zips for both splits directly in a folder (as the real data is shipped); member bytes."""
    folder = tmp_path_factory.mktemp("omniglot-zips")
    members = {split: omniglot_zip(folder / f"images_{split}.zip", split) for split in omniglot.SPLITS}
    return folder, members


@pytest.fixture
def data_dir(tmp_path, synthetic, monkeypatch):
    """A fresh data dir holding copies of the synthetic zips in `omniglot/`; downloads impossible."""
    monkeypatch.setenv(omniglot.URL_PREFIX_ENV, UNREACHABLE)
    (tmp_path / "omniglot").mkdir()
    for split in omniglot.SPLITS:
        name = f"images_{split}.zip"
        (tmp_path / "omniglot" / name).write_bytes((synthetic[0] / name).read_bytes())
    return tmp_path


def test_omniglot_from_zip_sorted_classes_and_lanczos_pixels(data_dir, synthetic):
    data = load_dataset("omniglot", "background", data_dir=data_dir, quiet=True)
    assert isinstance(data, ClassImages)
    assert data.class_names == expected_names()
    assert data.images.shape == (7, DRAWINGS, 1, 28, 28) and data.images.dtype == torch.float32
    assert (data.num_classes, data.per_class, data.image_shape) == (7, DRAWINGS, (1, 28, 28))
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    assert data.images[..., 0, 0].eq(1.0).all()  # background white = 1: no inversion (paper convention)
    members = synthetic[1]["background"]
    for c, d in [(0, 0), (3, 7), (6, 19)]:  # Armenian/character01 first, Tifinagh/character03 last
        alphabet, character = data.class_names[c].split("/")
        folder, suffix = f"/{alphabet}/{character}/", f"_{d + 1:02d}.png"
        name = next(n for n in members if folder in n and n.endswith(suffix))
        reference = Image.open(io.BytesIO(members[name])).convert("L")
        reference = reference.resize((28, 28), Image.Resampling.LANCZOS)
        expected = torch.from_numpy(np.asarray(reference, dtype=np.float32) / 255)
        assert torch.equal(data.images[c, d, 0], expected)


def test_size_84_and_evaluation_split(data_dir):
    data = load_dataset("omniglot", "evaluation", size=84, data_dir=data_dir, quiet=True)
    assert data.images.shape == (7, DRAWINGS, 1, 84, 84)
    assert (data_dir / "omniglot" / "omniglot-evaluation-84.pt").is_file()


def test_second_load_uses_cache_and_changed_source_rebuilds(data_dir, monkeypatch):
    first = load_dataset("omniglot", "background", data_dir=data_dir, quiet=True)
    cache = data_dir / "omniglot" / "omniglot-background-28.pt"
    assert cache.is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although a valid cache exists")

    monkeypatch.setattr(omniglot, "decode_images", no_decoding)
    second = load_dataset("omniglot", "background", data_dir=data_dir, quiet=True)
    assert torch.equal(first.images, second.images) and first.class_names == second.class_names

    monkeypatch.undo()
    monkeypatch.setenv(omniglot.URL_PREFIX_ENV, UNREACHABLE)
    os.utime(data_dir / "omniglot" / "images_background.zip", ns=(1, 1))  # the source changed
    calls = []
    real_decode = decode_module.decode_images
    monkeypatch.setattr(omniglot, "decode_images", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    third = load_dataset("omniglot", "background", data_dir=data_dir, quiet=True)
    assert calls == [1] and torch.equal(first.images, third.images)
    cache.write_bytes(b"not a torch file")  # a corrupt cache is rebuilt, not trusted
    rebuilt = load_dataset("omniglot", "background", data_dir=data_dir, quiet=True)
    assert torch.equal(rebuilt.images, first.images)
    assert len(calls) == 2


def test_extracted_folders_give_the_same_data_and_are_never_modified(tmp_path, data_dir, monkeypatch):
    from_zip = load_dataset("omniglot", "background", data_dir=data_dir, quiet=True)
    extracted = tmp_path / "extracted"
    with zipfile.ZipFile(data_dir / "omniglot" / "images_background.zip") as archive:
        archive.extractall(extracted)  # -> extracted/images_background/<Alphabet>/<character>/*.png
    before = snapshot(extracted)
    from_folder = load_dataset("omniglot", "background", data_dir=extracted, quiet=True)
    assert from_folder.class_names == from_zip.class_names
    assert torch.equal(from_folder.images, from_zip.images)
    assert snapshot(extracted) == before


def test_existing_zips_are_trusted_without_md5_and_never_overwritten(data_dir):
    before = snapshot(data_dir)
    assert (
        hashlib.md5((data_dir / "omniglot" / "images_background.zip").read_bytes()).hexdigest()
        != omniglot.MD5["background"]
    )  # not the official file, yet used as is (no download attempted)
    for split in omniglot.SPLITS:
        load_dataset("omniglot", split, data_dir=data_dir, quiet=True)
    assert snapshot(data_dir) == before


def test_zips_directly_in_data_dir_and_workers_give_identical_results(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv(omniglot.URL_PREFIX_ENV, UNREACHABLE)
    serial = load_dataset(
        "omniglot", "background", data_dir=synthetic[0], cache_dir=tmp_path / "a", workers=1, quiet=True
    )
    monkeypatch.setattr(decode_module, "CHUNK", 16)
    monkeypatch.setattr(decode_module, "PARALLEL_MIN_IMAGES", 0)
    parallel = load_dataset(
        "omniglot", "background", data_dir=synthetic[0], cache_dir=tmp_path / "b", workers=2, quiet=True
    )
    assert torch.equal(serial.images, parallel.images)
    assert (tmp_path / "b" / "omniglot-background-28.pt").is_file()


class _Server(http.server.BaseHTTPRequestHandler):
    """/good/<name>: the file; /bad/<name>: wrong bytes; /partial/<name>: cut short once, then good."""

    files: dict[str, bytes] = {}
    hits: dict[str, int] = {}

    def do_GET(self):
        route, name = self.path.strip("/").split("/", 1)
        self.hits[route] = self.hits.get(route, 0) + 1
        body = self.files.get(name)
        if body is None:
            self.send_error(404)
            return
        send = body
        if route == "bad":
            send = body[::-1]
        elif route == "partial" and self.hits[route] == 1:
            send = body[: len(body) // 2]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(send)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(synthetic):
    _Server.files = {p.name: p.read_bytes() for p in synthetic[0].glob("*.zip")}
    _Server.hits = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _md5s(synthetic):
    return {
        split: hashlib.md5((synthetic[0] / f"images_{split}.zip").read_bytes()).hexdigest() for split in omniglot.SPLITS
    }


def test_first_use_downloads_checks_md5_and_preprocesses(tmp_path, synthetic, server, monkeypatch):
    monkeypatch.setenv(omniglot.URL_PREFIX_ENV, f"{server}/good/")
    monkeypatch.setattr(omniglot, "MD5", _md5s(synthetic))
    data = load_dataset("omniglot", "evaluation", data_dir=tmp_path, quiet=True)
    assert data.class_names == expected_names()
    downloaded = tmp_path / "omniglot" / "images_evaluation.zip"
    assert downloaded.read_bytes() == (synthetic[0] / "images_evaluation.zip").read_bytes()
    assert _Server.hits == {"good": 1}
    load_dataset("omniglot", "evaluation", data_dir=tmp_path, quiet=True)
    assert _Server.hits == {"good": 1}  # the local zip is used from then on


def test_md5_mismatch_is_retried_then_reported_leaving_nothing(tmp_path, server):
    dest = tmp_path / "images_background.zip"
    with pytest.raises(DataError, match="after 3 attempt.*md5 mismatch.*save it as"):
        download(f"{server}/bad/images_background.zip", dest, "0" * 32, retries=3, backoff_s=0, quiet=True)
    assert _Server.hits == {"bad": 3}
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file


def test_partial_download_never_looks_complete_and_is_retried(tmp_path, synthetic, server):
    md5 = _md5s(synthetic)["background"]
    dest = tmp_path / "images_background.zip"
    with pytest.raises(DataError, match="incomplete transfer"):
        download(f"{server}/partial/images_background.zip", dest, md5, retries=1, backoff_s=0, quiet=True)
    assert list(tmp_path.iterdir()) == []
    _Server.hits = {}
    download(f"{server}/partial/images_background.zip", dest, md5, retries=2, backoff_s=0, quiet=True)
    assert _Server.hits == {"partial": 2}
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]
    assert hashlib.md5(dest.read_bytes()).hexdigest() == md5


def test_download_from_file_url(tmp_path, synthetic):
    source = synthetic[0] / "images_background.zip"
    dest = download(source.as_uri(), tmp_path / "x.zip", _md5s(synthetic)["background"], quiet=True)
    assert dest.read_bytes() == source.read_bytes()


def test_missing_data_and_unreachable_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(omniglot.URL_PREFIX_ENV, UNREACHABLE)
    monkeypatch.setattr("metacl.meta.data.download.time.sleep", lambda s: None)
    with pytest.raises(DataError, match="could not download .*images_background.zip after 3 attempt"):
        load_dataset("omniglot", "background", data_dir=tmp_path, quiet=True)
    assert not (tmp_path / "omniglot" / "images_background.zip").exists()


def test_corrupt_or_incomplete_zips_are_data_errors(tmp_path, synthetic, monkeypatch):
    monkeypatch.setenv(omniglot.URL_PREFIX_ENV, UNREACHABLE)
    members = synthetic[1]["background"]
    broken = next(n for n in sorted(members) if n.endswith("_05.png"))
    for case, keep, replace in [
        ("corrupt", members, {broken: b"not a png"}),
        ("incomplete", {n: b for n, b in members.items() if n != broken}, {}),
    ]:
        folder = tmp_path / case
        folder.mkdir()
        with zipfile.ZipFile(folder / "images_background.zip", "w") as archive:
            for name, data in {**keep, **replace}.items():
                archive.writestr(name, data)
        message = f"cannot read image .*{broken}" if case == "corrupt" else "different numbers of drawings"
        with pytest.raises(DataError, match=message):
            load_dataset("omniglot", "background", data_dir=folder, quiet=True)
        assert not list(folder.rglob("*.pt"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="mnist", split="train"), "unknown dataset 'mnist'; valid datasets: folder, omniglot"),
        (dict(name="omniglot", split="train"), "unknown Omniglot split 'train'; valid splits: background, evaluation"),
        (dict(name="omniglot", split="evaluation", first_963=True), "first_963 applies to the Omniglot background"),
        (dict(name="omniglot", split="background", first_963=True), "first_963 needs at least 963 classes.* has 7"),
        (dict(name="omniglot", split="background", size=0), "size must be a positive number"),
        (dict(name="folder", split="train", data_dir=None), "folder dataset needs data_dir"),
        (dict(name="omniglot", split="background", device="tpu"), "unknown device 'tpu'"),
    ],
)
def test_bad_names_and_options_are_clear_errors(kwargs, message, data_dir):
    kwargs.setdefault("data_dir", data_dir)
    with pytest.raises(ConfigError, match=message):
        load_dataset(kwargs.pop("name"), kwargs.pop("split"), quiet=True, **kwargs)


def _folder_dataset(root: Path) -> None:
    """root/{train,val}/<class>/*.png of 84x84 RGB; class 'b' of train has one extra image."""
    rng = np.random.default_rng(1)
    for split, classes in {"train": ["c", "a", "b"], "val": ["z"]}.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(5 if name == "b" else 4):
                pixels = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"img{i}.png")


def test_folder_dataset(tmp_path, caplog):
    root = tmp_path / "mini"
    _folder_dataset(root)
    options = dict(data_dir=root, cache_dir=tmp_path / "cache", quiet=True)
    with caplog.at_level(logging.WARNING):
        data = load_dataset("folder", "train", size=84, **options)
    assert "keeping the first 4" in caplog.text
    assert data.class_names == ["a", "b", "c"]
    assert data.images.shape == (3, 4, 3, 84, 84)
    expected = np.asarray(Image.open(root / "train" / "b" / "img2.png"), dtype=np.float32) / 255
    assert torch.equal(data.images[1, 2], torch.from_numpy(expected).permute(2, 0, 1))
    small = load_dataset("folder", "val", size=28, **options)
    assert small.images.shape == (1, 4, 3, 28, 28) and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    again = load_dataset("folder", "train", size=84, **options)
    assert torch.equal(again.images, data.images)
    with pytest.raises(ConfigError, match="unknown split 'test'; valid splits: train, val"):
        load_dataset("folder", "test", **options)


def _classes(n: int) -> ClassImages:
    images = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1, 1).expand(n, 2, 1, 3, 3)
    return ClassImages(images.clone(), [f"class{i}" for i in range(n)])


def test_split_classes_is_seeded_disjoint_and_complete():
    data = _classes(50)
    train, val = split_classes(data, 10, seed=3)
    assert (train.num_classes, val.num_classes) == (40, 10)
    assert set(train.class_names).isdisjoint(val.class_names)
    assert set(train.class_names) | set(val.class_names) == set(data.class_names)
    labels = val.images[:, 0, 0, 0, 0].long().tolist()
    assert labels == sorted(labels) and val.class_names == [f"class{i}" for i in labels]
    again_train, again_val = split_classes(data, 10, seed=3)
    assert again_val.class_names == val.class_names and torch.equal(again_train.images, train.images)
    assert split_classes(data, 10, seed=4)[1].class_names != val.class_names
    assert split_classes(data, 0.2, seed=3)[1].class_names == val.class_names  # 0.2 of 50 classes = 10
    assert split_classes(data, 0, seed=3)[0].num_classes == 50


def test_class_images_flatten_select_and_to():
    data = _classes(4)
    images, labels = data.flatten()
    assert images.shape == (8, 1, 3, 3) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(images[:, 0, 0, 0], labels.float())
    picked = data.select([3, 1])
    assert picked.class_names == ["class3", "class1"] and picked.images[:, 0, 0, 0, 0].tolist() == [3, 1]
    moved = data.to("cpu")
    assert moved.device == torch.device("cpu") and torch.equal(moved.images, data.images)


@pytest.mark.parametrize("bad", [50, -1, 1.0, True, "10"])
def test_split_classes_rejects_bad_sizes(bad):
    with pytest.raises(ConfigError, match="val_classes"):
        split_classes(_classes(50), bad, seed=0)


def test_random_resized_crop_shape_determinism_and_zoom():
    ramp = torch.linspace(0, 1, 28).expand(4, 5, 1, 28, 28).contiguous()  # value = x position
    crop = random_resized_crop(ramp, torch_generator(0, "aug"))
    assert crop.shape == ramp.shape and crop.dtype == ramp.dtype
    assert torch.equal(crop, random_resized_crop(ramp, torch_generator(0, "aug")))
    assert not torch.equal(crop, random_resized_crop(ramp, torch_generator(1, "aug")))
    assert not torch.equal(crop[0, 0], crop[0, 1])  # each image gets its own crop
    same = random_resized_crop(ramp, torch_generator(0, "aug"), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(same, ramp, atol=1e-6)
    quarter = random_resized_crop(ramp, torch_generator(0, "aug"), scale=(0.25, 0.25), ratio=(1.0, 1.0))
    spans = quarter[..., 0, :, 26] - quarter[..., 0, :, 1]  # half the width -> half the slope
    assert torch.allclose(spans, torch.full_like(spans, 0.5 * 25 / 27), atol=1e-5)


def test_cli_prepares_omniglot(data_dir, capsys):
    assert main(["data", "omniglot", "--data-dir", str(data_dir), "--size", "28", "84", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "background  28px: 7 classes x 20 drawings" in out and "evaluation  84px" in out
    assert sorted(p.name for p in (data_dir / "omniglot").glob("*.pt")) == [
        "omniglot-background-28.pt",
        "omniglot-background-84.pt",
        "omniglot-evaluation-28.pt",
        "omniglot-evaluation-84.pt",
    ]


@pytest.mark.parametrize("argv", [["--size", "x"], ["--split", "train"], ["--bogus"]])
def test_cli_bad_arguments_exit_2(argv, data_dir):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "omniglot", "--data-dir", str(data_dir), *argv])
    assert exit_info.value.code == 2


def test_cli_bad_size_and_missing_data_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(omniglot.URL_PREFIX_ENV, UNREACHABLE)
    monkeypatch.setattr("metacl.meta.data.download.time.sleep", lambda s: None)
    assert main(["data", "omniglot", "--data-dir", str(tmp_path), "--size", "0"]) == 2
    assert main(["data", "omniglot", "--data-dir", str(tmp_path), "--quiet"]) == 2
    assert "error: could not download" in capsys.readouterr().err


@pytest.mark.parametrize(
    "split, count, first",
    [("background", 964, "Alphabet_of_the_Magi/character01"), ("evaluation", 659, "Angelic/character01")],
)
def test_real_omniglot_layout(omniglot_dir, split, count, first):
    names, files, per_class = omniglot.list_drawings(omniglot_dir / f"images_{split}.zip")
    assert (len(names), per_class, len(files.names)) == (count, 20, count * 20)
    assert names == sorted(names) and len(set(names)) == count and names[0] == first


def test_real_omniglot_drawings_decode_to_white_background(omniglot_dir):
    names, files, per_class = omniglot.list_drawings(omniglot_dir / "images_evaluation.zip")
    some = decode_module.ImageFiles(files.names[: 3 * per_class], files.archive)
    pixels = decode_module.decode_images(some, 28, "L", workers=1, quiet=True)
    assert pixels.shape == (60, 1, 28, 28) and pixels.min() == 0 and pixels.max() == 255
    assert 0.85 < pixels.mean() / 255 < 0.97  # mostly white background (1), dark strokes (0)


@pytest.mark.slow
def test_real_omniglot_full_splits_cache_and_first_963(omniglot_dir, tmp_path):
    options = dict(data_dir=omniglot_dir, cache_dir=tmp_path, quiet=True)
    evaluation = load_dataset("omniglot", "evaluation", **options)
    assert evaluation.images.shape == (659, 20, 1, 28, 28)
    data = load_dataset("omniglot", "background", **options)
    assert data.images.shape == (964, 20, 1, 28, 28)
    assert 0.85 < data.images.mean() < 0.97
    first = load_dataset("omniglot", "background", first_963=True, **options)
    assert first.class_names == data.class_names[:963] and torch.equal(first.images, data.images[:963])
