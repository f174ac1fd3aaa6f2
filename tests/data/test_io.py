"""Tests for medkd.data.io: round trips for every ending, 4D NIfTI, errors naming the file."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medkd.data.io import (
    SUPPORTED_ENDINGS,
    Geometry,
    ImageReadError,
    file_ending,
    read_header,
    read_image,
    write_image,
)

ROTATED = Geometry((0.7, 1.1, 2.5), (-12.5, 30.0, 7.25), (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0))


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_3d_round_trip(tmp_path, ending, dtype):
    array = (np.random.default_rng(0).normal(size=(5, 6, 7)) * 100).astype(dtype)
    path = tmp_path / "sub" / f"img{ending}"
    write_image(array, ROTATED, path)
    back, geometry = read_image(path)
    assert back.dtype == dtype and back.shape == (5, 6, 7)
    np.testing.assert_array_equal(back, array)
    assert geometry.matches(ROTATED, atol=1e-5)
    shape, header_geometry = read_header(path)
    assert shape == (5, 6, 7) and header_geometry.matches(ROTATED, atol=1e-5)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_numpy_order_matches_simpleitk_xyz(tmp_path):
    array = np.zeros((3, 4, 5), np.float32)  # (z, y, x)
    array[2, 1, 0] = 1.0
    write_image(array, Geometry.default(3), tmp_path / "a.nii.gz")
    image = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    assert image.GetSize() == (5, 4, 3)
    assert image.GetPixel(0, 1, 2) == 1.0  # (x, y, z)


def test_png_round_trip(tmp_path):
    geometry = Geometry((0.5, 0.75), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    array = np.arange(12 * 9, dtype=np.int64).reshape(12, 9)
    write_image(array, geometry, tmp_path / "a.png")
    back, got = read_image(tmp_path / "a.png")
    assert back.shape == (12, 9) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, array)
    assert got.matches(geometry)
    assert read_header(tmp_path / "a.png")[0] == (12, 9)


def test_png_uint16_and_integral_floats(tmp_path):
    write_image(np.array([[0, 300], [65535, 7]]), Geometry.default(2), tmp_path / "big.png")
    back, _ = read_image(tmp_path / "big.png")
    assert back.dtype == np.uint16 and back.tolist() == [[0, 300], [65535, 7]]
    write_image(np.array([[1.0, 2.0]]), Geometry.default(2), tmp_path / "f.png")
    assert read_image(tmp_path / "f.png")[0].tolist() == [[1, 2]]


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.array([[-1, 2]]), "outside"),
        (np.array([[0, 70000]]), "outside"),
        (np.array([[0.5, 1.0]]), "integer"),
        (np.zeros((2, 3, 4), np.uint8), "2D"),
    ],
)
def test_png_rejects_bad_data(tmp_path, array, match):
    geometry = Geometry.default(array.ndim)
    with pytest.raises(ValueError, match=match):
        write_image(array, geometry, tmp_path / "bad.png")
    assert not list(tmp_path.iterdir())


def test_rgb_png_is_rejected_with_grayscale_message(tmp_path):
    path = tmp_path / "rgb.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 3), np.uint8), isVector=True), str(path))
    with pytest.raises(ImageReadError, match="grayscale") as info:
        read_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageReadError, match="grayscale"):
        read_header(path)


def test_4d_nifti_written_by_nibabel_reads_channel_first(tmp_path):
    data = np.random.default_rng(1).random((6, 5, 4, 2)).astype(np.float32)  # nibabel: (x, y, z, c)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.9, 3.0, 1.0])), tmp_path / "four.nii.gz")
    array, geometry = read_image(tmp_path / "four.nii.gz")
    assert array.shape == (2, 4, 5, 6)
    np.testing.assert_array_equal(array, data.transpose(3, 2, 1, 0))
    assert geometry.ndim == 3
    np.testing.assert_allclose(geometry.spacing, (0.8, 0.9, 3.0), atol=1e-6)
    assert read_header(tmp_path / "four.nii.gz")[0] == (2, 4, 5, 6)


def test_4d_round_trip_with_write_image(tmp_path):
    array = np.random.default_rng(2).random((3, 4, 5, 6)).astype(np.float32)
    write_image(array, ROTATED, tmp_path / "c.nii.gz")
    back, geometry = read_image(tmp_path / "c.nii.gz")
    np.testing.assert_array_equal(back, array)
    assert geometry.matches(ROTATED, atol=1e-5)
    with pytest.raises(ValueError, match="NIfTI"):
        write_image(array, ROTATED, tmp_path / "c.mha")


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file_raises_naming_the_file(tmp_path, ending):
    path = tmp_path / f"trunc{ending}"
    write_image(np.random.default_rng(3).random((8, 9, 10)).astype(np.float32), ROTATED, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value) and info.value.path == path


def test_missing_and_garbage_files_raise(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "garbage.mha").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="garbage.mha"):
        read_image(tmp_path / "garbage.mha")
    with pytest.raises(ImageReadError, match="unsupported"):
        read_image(tmp_path / "x.jpg")


def test_file_ending():
    assert file_ending("a/b/case_0000.nii.gz") == ".nii.gz"
    assert file_ending("CASE.NII") == ".nii"
    assert [file_ending(f"x{e}") for e in SUPPORTED_ENDINGS] == list(SUPPORTED_ENDINGS)
    with pytest.raises(ValueError, match="unsupported"):
        file_ending("image.jpg")


def test_geometry_matches_and_dict_round_trip():
    moved = Geometry(ROTATED.spacing, (ROTATED.origin[0] + 0.01, *ROTATED.origin[1:]), ROTATED.direction)
    assert ROTATED.matches(ROTATED)
    assert not ROTATED.matches(moved) and ROTATED.matches(moved, atol=0.05)
    assert ROTATED.differences(moved) == ["origin"]
    assert not ROTATED.matches(Geometry.default(2))
    assert Geometry.from_dict(json.loads(json.dumps(ROTATED.to_dict()))) == ROTATED
    with pytest.raises(KeyError, match="origin"):
        Geometry.from_dict({"spacing": [1, 1], "direction": [1, 0, 0, 1]})
    with pytest.raises(ValueError, match="direction"):
        Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0))


def test_write_replaces_existing_file_atomically(tmp_path):
    path = tmp_path / "a.nii.gz"
    write_image(np.zeros((2, 3, 4), np.float32), ROTATED, path)
    write_image(np.ones((2, 3, 4), np.float32), ROTATED, path)
    assert read_image(path)[0].min() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_nan_and_inf_survive_reading(tmp_path, ending):
    """ITK's NIfTI reader turns NaN/Inf into 0; read_image must keep them (validation relies on it)."""
    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    array[1, 2, 3], array[0, 0, 1], array[2, 3, 4] = np.nan, np.inf, -np.inf
    write_image(array, ROTATED, tmp_path / f"a{ending}")
    np.testing.assert_array_equal(read_image(tmp_path / f"a{ending}")[0], array)


def test_nan_in_nibabel_written_4d_nifti(tmp_path):
    data = np.ones((4, 3, 2, 2), np.float64)  # (x, y, z, c)
    data[3, 0, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "n.nii")
    array, _ = read_image(tmp_path / "n.nii")
    assert array.shape == (2, 2, 3, 4) and np.isnan(array[1, 1, 0, 3]) and np.isnan(array).sum() == 1


@pytest.mark.parametrize("ending", [".nii.gz", ".png"])
def test_a_write_that_silently_fails_raises_and_leaves_nothing(tmp_path, monkeypatch, ending):
    """SimpleITK ignores a failed write (a full disk leaves a 0-byte file): the write must not pass."""
    import medkd.data.io as io_module

    monkeypatch.setattr(io_module.sitk, "WriteImage", lambda image, name, useCompression=False: open(name, "wb").close())
    target = tmp_path / f"seg{ending}"
    array = np.zeros((4, 5), np.uint8) if ending == ".png" else np.zeros((3, 4, 5), np.uint8)
    geometry = io_module.Geometry((1.0,) * array.ndim, (0.0,) * array.ndim, tuple(np.eye(array.ndim).ravel()))
    with pytest.raises(OSError, match=f"seg{ending}.*incomplete file"):
        io_module.write_image(array, geometry, target)
    assert list(tmp_path.iterdir()) == []
