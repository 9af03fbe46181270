"""The compositional-scenes dataset: file layout, determinism, labels, scene rules, bad input, resume."""

import h5py
import numpy as np
import pytest
from PIL import Image

from metacl.cli import main
from metacl.core.errors import ConfigError, DataError
from metacl.scenes import generate as generate_module
from metacl.scenes.features import COLOURS, DIMENSIONS, FEATURES, dimension_of, feature_index
from metacl.scenes.generate import ensure_scenes, generate_scenes, valid_layouts
from metacl.scenes.h5 import OBJECT_DATASETS, SceneWriter, labels_from_objects, load_scenes, partial_path
from metacl.scenes.layout import layout_to_D
from metacl.scenes.preview import write_preview
from metacl.scenes.render import SceneRenderer

SEED = 3
COUNT = 24


@pytest.fixture(scope="module")
def scenes_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenes") / "scenes.h5"
    return generate_scenes(path, COUNT, seed=SEED, batch_size=16, quiet=True)


@pytest.fixture(scope="module")
def scenes(scenes_file):
    return load_scenes(scenes_file)


def test_feature_table_matches_the_reference_order():
    assert len(FEATURES) == 30 and DIMENSIONS == ("colour", "shape", "texture")
    assert FEATURES[0] == "blue" and FEATURES[9] == "yellow" and FEATURES[10] == "cone"
    assert FEATURES[17] == "rectangle" and FEATURES[19] == "torus" and FEATURES[23] == "metal"
    assert FEATURES[29] == "wood_plank" and COLOURS["pink"] == (255, 205, 243)
    assert [dimension_of(feature_index(n)) for n in ("cyan", "torus", "rug")] == [0, 1, 2]
    with pytest.raises(DataError, match="unknown feature 'mauve'"):
        feature_index("mauve")


def test_file_has_the_reference_layout_and_metacl_attributes(scenes_file):
    with h5py.File(scenes_file) as f:
        assert {"X", "D", "y", "Q", "properties"} <= set(f)
        assert f["X"].dtype == np.uint8 and f["X"].shape == (COUNT, 120, 160, 3)
        assert f["X"].chunks is not None and f["X"].chunks[1:] == (120, 160, 3)
        assert f["D"].dtype == np.uint8 and f["D"].shape == (COUNT, 5, 3)
        assert f["y"].dtype == np.uint8 and f["y"].shape == (COUNT, 30)
        assert f["Q"].dtype == np.uint8 and f["Q"].shape == (COUNT, 30, 30)
        assert (f["Q"][()] == np.eye(30, dtype=np.uint8)).all()
        assert [p.decode() for p in f["properties"][()]] == list(FEATURES)
        for name, (_, dtype, tail, _) in OBJECT_DATASETS.items():  # extra, per-object metadata
            assert f[name].dtype == dtype and f[name].shape == (COUNT, 5, *tail)
    attrs = load_scenes(scenes_file, limit=2).attrs
    assert attrs["metacl_format_version"] == 2 and attrs["metacl_seed"] == SEED
    assert (attrs["metacl_height"], attrs["metacl_width"], attrs["metacl_num_images"]) == (120, 160, COUNT)
    assert attrs["metacl_complete"] == 1 and attrs["metacl_generator"]["objects"] == [4, 5]


def test_labels_follow_objects_and_scene_rules_hold(scenes):
    assert (scenes.y == labels_from_objects(scenes.D)).all()
    counts = (scenes.D[:, :, 0] != 255).sum(axis=1)
    assert set(counts) <= {4, 5} and len(set(counts)) == 2
    for rows, count in zip(scenes.D, counts):
        objects = rows[:count]
        assert (rows[count:] == 255).all()
        for dim in range(3):  # no two objects share a colour, a shape or a texture
            assert len(set(objects[:, dim])) == count
            assert all(dim * 10 <= v < dim * 10 + 10 for v in objects[:, dim])
    assert scenes.y.sum(axis=1).tolist() == (3 * counts).tolist()
    # Images are not blank and differ from one another.
    assert scenes.X.std() > 20 and len({x.tobytes() for x in scenes.X}) == COUNT


def same_objects(a, b):
    """Identical per-object metadata (NaN fill values compare equal)."""
    return all(np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True) for name in a.__dataclass_fields__)


def test_same_seed_gives_identical_bytes_whatever_the_batch_size(scenes, tmp_path):
    again = load_scenes(generate_scenes(tmp_path / "b.h5", 10, seed=SEED, batch_size=3, quiet=True))
    assert np.array_equal(again.X, scenes.X[:10]) and np.array_equal(again.D, scenes.D[:10])
    assert np.array_equal(again.y, scenes.y[:10])
    assert same_objects(again.objects, scenes.objects.select(slice(10)))
    other = load_scenes(generate_scenes(tmp_path / "c.h5", 10, seed=SEED + 1, quiet=True))
    assert not np.array_equal(other.D, scenes.D[:10])


def test_worker_processes_give_identical_bytes(scenes, tmp_path):
    parallel = load_scenes(generate_scenes(tmp_path / "w.h5", 12, seed=SEED, batch_size=4, workers=2, quiet=True))
    assert np.array_equal(parallel.X, scenes.X[:12]) and np.array_equal(parallel.D, scenes.D[:12])
    assert same_objects(parallel.objects, scenes.objects.select(slice(12)))


def test_every_object_keeps_enough_visible_pixels(scenes):
    renderer = SceneRenderer(120, 160)
    layout = valid_layouts(SEED, np.arange(COUNT), renderer)
    assert np.array_equal(layout_to_D(layout), scenes.D)
    visible = renderer.visibility(layout).numpy()
    assert (visible[layout.present] >= 700).all()
    assert (visible[~layout.present] == 0).all()
    # The check is live: the smallest object of some image is near the threshold, not far above it.
    assert visible[layout.present].min() < 1000


def test_object_metadata_matches_the_layout_and_the_renderer(scenes):
    renderer = SceneRenderer(120, 160)
    layout = valid_layouts(SEED, np.arange(COUNT), renderer)
    objects, present = scenes.objects, layout.present
    assert len(objects) == COUNT and np.array_equal(present, scenes.D[:, :, 0] != 255)
    # Absent slots hold the fill values, present ones real values.
    for name in ("position", "rotation", "depth", "pixel_centre", "visible_pixels"):
        values = getattr(objects, name)
        assert np.isnan(values[~present]).all() and np.isfinite(values[present]).all()
    assert (objects.box[~present] == -1).all() and (objects.box[present] >= 0).all()
    # Scene description: ground position, orientation in degrees, distance along the view axis.
    assert np.allclose(objects.position[present], layout.position[present], atol=1e-6)
    assert np.allclose(objects.rotation[present], layout.rotation[present] * 30.0)
    assert np.allclose(objects.depth[present], renderer.depth(layout.position)[present], rtol=1e-6)
    assert (objects.depth[present] > 7).all() and (objects.depth[present] < 13).all()
    # Visible counts are the renderer's visibility (which the >= 700 rule checked).
    visible = renderer.visibility(layout).numpy()
    assert np.allclose(objects.visible_pixels[present], visible[present], rtol=1e-5)
    assert (objects.visible_pixels[present] >= 700).all()
    # Each box contains every pixel its object covers (so all of its visible pixels), and is tight.
    coverage = renderer.coverage(layout).numpy()
    rows, cols = np.arange(120)[:, None], np.arange(160)[None, :]
    for image, slot in zip(*np.nonzero(present)):
        left, top, right, bottom = objects.box[image, slot]
        covered = coverage[image, slot] > 0
        inside = (cols >= left) & (cols < right) & (rows >= top) & (rows < bottom)
        assert covered.any() and not (covered & ~inside).any()
        assert covered[:, left].any() and covered[:, right - 1].any()
        assert covered[top].any() and covered[bottom - 1].any()
        x, y = objects.pixel_centre[image, slot]
        assert left <= x <= right and top <= y <= bottom
        # Pixels only this object covers, fully (so certainly visible), are inside its box.
        others = np.delete(coverage[image], slot, axis=0).sum(axis=0)
        alone = (coverage[image, slot] > 0.999) & (others == 0)
        assert alone.sum() > 100 and inside[alone].all()
        # Centre: the coverage-weighted centroid of the object's pixels.
        weight = coverage[image, slot]
        assert np.isclose(x, ((cols + 0.5) * weight).sum() / weight.sum(), atol=1e-3)
        assert np.isclose(y, ((rows + 0.5) * weight).sum() / weight.sum(), atol=1e-3)


def _write(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data)
    return path


def _valid_arrays(count=3):
    D = np.full((count, 5, 3), 255, dtype=np.uint8)
    D[:, :4] = [[0, 10, 20], [1, 11, 21], [2, 12, 22], [3, 13, 23]]
    return {"X": np.zeros((count, 12, 16, 3), np.uint8), "D": D, "y": labels_from_objects(D)}


def test_reference_files_without_metacl_attributes_load(tmp_path):
    arrays = _valid_arrays()
    path = _write(
        tmp_path / "ref.h5",
        **arrays,
        Q=np.broadcast_to(np.eye(30, dtype=np.uint8), (3, 30, 30)),
        properties=np.array([f.encode() for f in FEATURES]),
    )
    scenes = load_scenes(path)
    assert scenes.attrs == {} and scenes.X.shape == (3, 12, 16, 3) and scenes.y[0, [0, 10, 20]].tolist() == [1, 1, 1]
    assert scenes.objects is None  # no object metadata in reference (or older metacl) files


def test_metacl_files_from_before_the_object_metadata_still_load(scenes_file, tmp_path):
    old = tmp_path / "v1.h5"
    with h5py.File(scenes_file) as new, h5py.File(old, "w") as f:
        for name in ("X", "D", "y", "Q", "properties"):
            f.create_dataset(name, data=new[name][()])
        for key, value in new.attrs.items():
            f.attrs[key] = value
        f.attrs["metacl_format_version"] = 1
    scenes = load_scenes(old, limit=5)
    assert scenes.objects is None and len(scenes) == 5 and scenes.attrs["metacl_format_version"] == 1
    assert not generate_module.matches(old, COUNT, seed=SEED, height=120, width=160)  # would regenerate
    write_preview(old, tmp_path / "plain.png", 4)
    with pytest.raises(DataError, match="no object metadata"):
        write_preview(old, tmp_path / "p.png", 4, boxes=True)


def test_partial_object_metadata_is_a_data_error(scenes_file, tmp_path):
    broken = tmp_path / "broken.h5"
    with h5py.File(scenes_file) as new, h5py.File(broken, "w") as f:
        for name in ("X", "D", "y", "object_box"):
            f.create_dataset(name, data=new[name][()])
    with pytest.raises(DataError, match="lacks"):
        load_scenes(broken)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("y"), "missing dataset 'y'"),
        (lambda a: a.update(X=a["X"].astype(np.float32)), "'X' has dtype float32, expected uint8"),
        (lambda a: a.update(D=a["D"][:, :4]), r"'D' has shape \(3, 4, 3\), expected \(N, 5, 3\)"),
        (lambda a: a.update(X=a["X"][:, :, :, :1]), r"'X' has shape \(3, 12, 16, 1\)"),
        (lambda a: a["y"].__setitem__((1, 7), 1), r"y\[1, 7\] = 1 but D\[1\] says 'purple' is absent"),
        (lambda a: a["D"].__setitem__((2, 0, 1), 5), r"D\[2, 0\] = \[0, 5, 20\] is not a valid object"),
        (lambda a: a.update(y=a["y"][:2]), "disagree on the number of images"),
    ],
)
def test_malformed_files_name_the_problem_and_where(tmp_path, change, message):
    arrays = _valid_arrays()
    change(arrays)
    with pytest.raises(DataError, match=message):
        load_scenes(_write(tmp_path / "bad.h5", **arrays))


def test_missing_and_non_hdf5_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_scenes(tmp_path / "absent.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        load_scenes(tmp_path / "text.h5")


def test_interrupted_generation_leaves_no_complete_looking_file_and_resumes(scenes, tmp_path, monkeypatch):
    out = tmp_path / "run.h5"
    real_write, written = SceneWriter.write, []

    def write_then_die(self, start, *arrays):
        real_write(self, start, *arrays)
        written.append(start)
        if len(written) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(SceneWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate_scenes(out, 20, seed=SEED, batch_size=4, quiet=True)
    assert not out.exists() and partial_path(out).exists()
    with pytest.raises(DataError, match="incomplete file .* after 8 images"):
        load_scenes(partial_path(out))

    written.clear()
    monkeypatch.setattr(SceneWriter, "write", real_write)
    resumed = load_scenes(generate_scenes(out, 20, seed=SEED, batch_size=4, quiet=True))
    assert np.array_equal(resumed.X, scenes.X[:20]) and np.array_equal(resumed.D, scenes.D[:20])
    assert same_objects(resumed.objects, scenes.objects.select(slice(20)))
    assert not partial_path(out).exists()


def test_partial_files_resume_only_with_identical_parameters(tmp_path):
    out = tmp_path / "x.h5"
    images, objects = np.zeros((2, 120, 160, 3), np.uint8), np.full((2, 5, 3), 255, np.uint8)
    with SceneWriter(out, 5, 120, 160, {"metacl_seed": 99}) as writer:
        writer.write(0, images, objects)
    with SceneWriter(out, 5, 120, 160, {"metacl_seed": 99}) as writer:
        assert writer.start == 2
    with SceneWriter(out, 5, 120, 160, {"metacl_seed": 1}) as writer:
        assert writer.start == 0
        with pytest.raises(DataError, match="only 0 of 5 images written"):
            writer.finish()
    partial_path(out).write_bytes(b"truncated garbage")
    with SceneWriter(out, 5, 120, 160, {"metacl_seed": 1}) as writer:
        assert writer.start == 0
    assert not out.exists()


def test_ensure_scenes_generates_once_under_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("METACL_DATA_DIR", str(tmp_path / "data"))
    path = ensure_scenes(None, 6, seed=SEED, height=120, width=160, device="cpu", quiet=True)
    assert path.parent == tmp_path / "data" / "scenes" and len(load_scenes(path)) == 6

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a matching file")

    monkeypatch.setattr(generate_module, "generate_scenes", fail)
    assert ensure_scenes(None, 6, seed=SEED, height=120, width=160, device="cpu", quiet=True) == path
    with pytest.raises(AssertionError):
        ensure_scenes(None, 6, seed=SEED + 1, height=120, width=160, device="cpu", quiet=True)


def test_cli_generates_and_previews(scenes, tmp_path, capsys):
    out = tmp_path / "cli.h5"
    assert main(["data", "scenes", "--num-images", "6", "--out", str(out), "--seed", str(SEED), "--quiet"]) == 0
    assert np.array_equal(load_scenes(out).X, scenes.X[:6])
    png = tmp_path / "sheet.png"
    assert main(["data", "preview", str(out), "--out", str(png), "--n", "4"]) == 0
    with Image.open(png) as sheet:
        assert sheet.width > 2 * 320 and sheet.height > 2 * 240
        pixels = np.asarray(sheet.convert("RGB"))
    assert pixels.std() > 20
    assert f"wrote {png}" in capsys.readouterr().out
    boxed = tmp_path / "boxes.png"
    assert main(["data", "preview", str(out), "--out", str(boxed), "--n", "4", "--boxes"]) == 0
    with Image.open(boxed) as sheet:
        with_boxes = np.asarray(sheet.convert("RGB"))
    assert with_boxes.shape == pixels.shape and (with_boxes != pixels).any(axis=-1).sum() > 500


def test_cli_default_output_goes_to_the_data_dir(tmp_path):
    assert main(["data", "scenes", "--num-images", "4", "--data-dir", str(tmp_path), "--quiet"]) == 0
    assert len(list((tmp_path / "scenes").glob("scenes-4-120x160-seed0-v*.h5"))) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "scenes", "--num-images", "0", "--out", "x.h5"], "--num-images: must be at least 1"),
        (["data", "scenes", "--num-images", "many", "--out", "x.h5"], "expected a whole number"),
        (["data", "scenes", "--out", "x.h5"], "required: --num-images"),
        (["data", "scenes", "--num-images", "2", "--seed", "-1", "--out", "x.h5"], "must be at least 0"),
        (["data", "preview", "x.h5", "--out", "p.png", "--n", "0"], "--n: must be at least 1"),
    ],
)
def test_bad_cli_arguments_exit_2_with_a_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "scenes", "--num-images", "2", "--device", "tpu"], "unknown device 'tpu'"),
        (["data", "scenes", "--num-images", "2", "--height", "10"], "too small"),
        (["data", "scenes", "--num-images", "2", "--width", "600"], "aspect ratio"),
        (["data", "preview", "absent.h5", "--out", "p.png"], "no such file"),
    ],
)
def test_bad_values_are_user_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv + (["--out", "x.h5"] if argv[1] == "scenes" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "p.png").exists()


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="num_images must be at least 1"):
        generate_scenes(tmp_path / "a.h5", 0)
    with pytest.raises(ConfigError, match="batch_size"):
        generate_scenes(tmp_path / "a.h5", 3, batch_size=0)


def test_two_processes_sharing_a_default_scenes_file_generate_it_once(tmp_path):
    """Runs of a sweep start together and ask for the same default file: one generates it, the
    other waits for it, and both get the complete file."""
    import subprocess
    import sys

    code = (
        "import sys; from metacl.scenes.generate import ensure_scenes; "
        f"print(ensure_scenes('{tmp_path / 'shared.h5'}', 24, seed=1, height=48, width=64, quiet=True))"
    )
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].strip() for p in processes]
    assert [p.returncode for p in processes] == [0, 0] and outputs == [str(tmp_path / "shared.h5")] * 2
    assert len(load_scenes(tmp_path / "shared.h5")) == 24
