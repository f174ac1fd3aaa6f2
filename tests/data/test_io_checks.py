"""Images whose header declares more than the file can hold are refused before any voxel is read."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import medkd
from medkd.data import io_checks
from medkd.data.io import Geometry, ImageReadError, read_image, write_image
from medkd.data.validate import check_dataset


def _geometry() -> Geometry:
    return Geometry.default(3)


def _claiming_nifti(path: Path, shape: tuple[int, ...], payload: int = 2000, compress: bool = True) -> Path:
    """A NIfTI file whose header declares ``shape`` float32 but which holds ``payload`` random bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    data = header.binaryblock + bytes(4) + np.random.default_rng(0).bytes(payload)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def test_small_file_claiming_a_huge_volume_is_refused_without_allocating(tmp_path):
    """0.5 MB .nii.gz declaring 1200x1200x700 float32 (3.8 GiB), read under a 2 GiB address-space limit:
    before, ITK tried to allocate the declared buffer ("Failed to allocate memory for image")."""
    bomb = _claiming_nifti(tmp_path / "bomb_0000.nii.gz", (1200, 1200, 700), payload=500_000)
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
              "from medkd.data.io import read_image\n"
              "try:\n    read_image(sys.argv[1])\nexcept Exception as err:\n    print(err)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(medkd.__file__).parents[1]), "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True, text=True, env=env,
                         timeout=60)
    assert str(bomb) in out.stdout and "declares 1200x1200x700 32-bit float" in out.stdout, out.stdout + out.stderr
    assert "compression gives at most" in out.stdout


def test_check_data_names_the_implausible_file(nnunet_factory):
    root = nnunet_factory(num_train=2, num_test=0, channels=1)
    bad = _claiming_nifti(root / "imagesTr" / "case_001_0000.nii.gz", (400, 400, 300))
    [problem] = check_dataset(root)
    assert (problem.kind, problem.case, problem.file) == ("unreadable", "case_001", bad)
    assert "header declares 400x400x300" in problem.message


def test_uncompressed_nifti_must_hold_its_declared_voxels(tmp_path):
    bad = _claiming_nifti(tmp_path / "short.nii", (64, 64, 40), payload=1000, compress=False)
    with pytest.raises(ImageReadError, match="short.nii: file is truncated: the header declares 64x64x40"):
        read_image(bad)


def test_absolute_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "a.nii.gz"
    write_image(np.ones((8, 32, 32), np.float32), _geometry(), path)  # 32 KiB of voxels
    monkeypatch.setenv("MEDKD_MAX_IMAGE_GB", str(16 / (1 << 20)))  # 16 KiB
    with pytest.raises(ImageReadError, match="a.nii.gz: the header declares 32x32x8 .*MEDKD_MAX_IMAGE_GB"):
        read_image(path)
    monkeypatch.setenv("MEDKD_MAX_IMAGE_GB", "lots")
    with pytest.raises(ValueError, match="MEDKD_MAX_IMAGE_GB must be a number"):
        read_image(path)


@pytest.mark.parametrize("ending", [".nii.gz", ".mha", ".png"])
def test_maximally_compressed_real_images_still_read(tmp_path, ending):
    """All-zero volumes compress ~1000x: the 2000x bound must let them through."""
    shape = (1024, 1024) if ending == ".png" else (32, 256, 256)
    path = tmp_path / f"zeros{ending}"
    image = sitk.GetImageFromArray(np.zeros(shape, np.uint8))
    sitk.WriteImage(image, str(path), useCompression=True)
    assert np.prod(shape) / path.stat().st_size > 500
    assert read_image(path)[0].shape == shape


def test_metaimage_with_detached_voxels_reads(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    (tmp_path / "vol.raw").write_bytes(array.tobytes())
    (tmp_path / "vol.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 6 5 4\nElementType = MET_FLOAT\n"
                                      "ElementByteOrderMSB = False\nElementDataFile = vol.raw\n")
    np.testing.assert_array_equal(read_image(tmp_path / "vol.mha")[0], array)


def test_nifti_is_scanned_in_bounded_memory(tmp_path, monkeypatch):
    """Before, the NaN/truncation scan held the whole decompressed file beside the array (2x the volume)."""
    array = np.random.default_rng(0).standard_normal((32, 128, 256)).astype(np.float32)  # 4 MiB
    array[3, 4, 5], array[31, 127, 255] = np.nan, -np.inf
    path = tmp_path / "v.nii.gz"
    write_image(array, _geometry(), path)
    monkeypatch.setattr(io_checks, "SCAN_CHUNK", 1 << 18)
    tracemalloc.start()
    try:
        image, _ = read_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * array.nbytes, f"peak {peak / array.nbytes:.2f}x the volume"
    assert np.isnan(image[3, 4, 5]) and image[31, 127, 255] == -np.inf
    np.testing.assert_array_equal(np.isfinite(image), np.isfinite(array))
