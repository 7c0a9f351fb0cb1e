import numpy as np
import pytest

from edgeq.calibration_data import CalibrationData, InputSpec
from edgeq.errors import UserError

SPEC = [InputSpec("x", np.dtype(np.float32), (None, 3, 4, 4))]


def test_npz_folder_streams_feeds_with_extras(tmp_path):
    for i in range(5):
        np.savez(tmp_path / f"{i}.npz", x=np.full((1, 3, 4, 4), i, np.float32), label=np.array([i]))
    data = CalibrationData.from_path(tmp_path, SPEC)
    feeds = list(data)
    assert len(feeds) == 5 and feeds[3].inputs["x"][0, 0, 0, 0] == 3 and feeds[3].extras["label"][0] == 3


def test_string_inputs_take_the_arrays_numpy_saves_strings_as(tmp_path):
    """A tabular model's categorical input (ONNX string, numpy object): numpy saves strings as str_ arrays,
    which once were refused as 'save it as object' (object arrays need pickling to load)."""
    np.savez(tmp_path / "0.npz", color=np.array([["red"], ["blue"]]))
    feed = next(iter(CalibrationData.from_path(tmp_path, [InputSpec("color", np.dtype(object), (None, 1))])))
    assert feed.inputs["color"].dtype == object and feed.inputs["color"].tolist() == [["red"], ["blue"]]


def test_stacked_file_is_cut_into_batch_one_feeds(tmp_path):
    np.savez(tmp_path / "all.npz", x=np.arange(7 * 48, dtype=np.float32).reshape(7, 3, 4, 4))
    data = CalibrationData.from_path(tmp_path / "all.npz", SPEC)
    assert len(data) == 7 and next(iter(data)).inputs["x"].shape == (1, 3, 4, 4)


def test_npy_folder_for_single_input(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4, 4), np.float32))
    assert len(CalibrationData.from_path(tmp_path, SPEC)) == 1


def test_split_is_deterministic_and_disjoint(tmp_path):
    np.savez(tmp_path / "all.npz", x=np.random.default_rng(0).standard_normal((10, 3, 4, 4)).astype(np.float32))
    data = CalibrationData.from_path(tmp_path / "all.npz", SPEC)
    calib, held = data.split(0.2)
    assert len(calib) == 8 and len(held) == 2
    again, _ = data.split(0.2)
    assert [f.origin for f in calib] == [f.origin for f in again]
    assert not {f.origin for f in calib} & {f.origin for f in held}
    assert calib.digest != held.digest


def test_image_folder_needs_declared_preprocessing(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((6, 5, 3), 255, np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="preprocess.toml"):
        CalibrationData.from_path(tmp_path, SPEC)
    (tmp_path / "preprocess.toml").write_text('size = [4, 4]\nscale = 0.00392156862745098\nmean = [0.5, 0.5, 0.5]\n'
                                              'std = [0.5, 0.5, 0.5]\nlayout = "NCHW"\n')
    feed = next(iter(CalibrationData.from_path(tmp_path, SPEC)))
    assert feed.inputs["x"].shape == (1, 3, 4, 4) and np.allclose(feed.inputs["x"], 1.0)


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros((1, 3, 4, 4), np.float32)}, "lacks model input 'x'"),
    ({"x": np.zeros((1, 3, 4, 4), np.float64)}, "float64, the model expects float32"),
    ({"x": np.zeros((1, 3, 5, 4), np.float32)}, "shape"),
    ({"x": np.full((1, 3, 4, 4), np.nan, np.float32)}, "NaN or Inf"),
])
def test_mismatched_feeds_are_named(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=message):
        list(CalibrationData.from_path(tmp_path, SPEC))


def test_empty_and_missing_sources(tmp_path):
    with pytest.raises(UserError, match="empty"):
        CalibrationData.from_path(tmp_path, SPEC)
    with pytest.raises(UserError, match="not found"):
        CalibrationData.from_path(tmp_path / "nope", SPEC)


def test_random_data_is_seeded_and_says_so():
    a = [f.inputs["x"] for f in CalibrationData.random(SPEC, 3, seed=1)]
    b = [f.inputs["x"] for f in CalibrationData.random(SPEC, 3, seed=1)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert CalibrationData.random(SPEC, 3).describe()["random"]


def test_random_data_refuses_integer_inputs():
    with pytest.raises(UserError, match="int64 input 'ids'"):
        CalibrationData.random([InputSpec("ids", np.dtype(np.int64), (1, 8))])


def test_split_of_few_feeds_still_holds_one_back(tmp_path):
    np.savez(tmp_path / "all.npz", x=np.zeros((3, 3, 4, 4), np.float32))
    calib, held = CalibrationData.from_path(tmp_path / "all.npz", SPEC).split(0.2)
    assert len(calib) == 2 and len(held) == 1
