from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medkd.data.dataset import load_dataset
from medkd.data.io import Geometry, read_image, write_image
from medkd.data.preprocess import make_plan
from medkd.engine.inference import Predictor, group_channel_files, predict_folder
from medkd.models import create
from medkd.storage import save_checkpoint


def _checkpoint(dataset_root, path, mode, patch, target_spacing=None):
    dataset = load_dataset(dataset_root)
    plan = make_plan(dataset, dataset.training[:2], mode=mode, target_spacing=target_spacing)
    model = create("unet", 2 if mode == "2d" else 3, dataset.num_channels, dataset.num_classes, preset="student")
    save_checkpoint({"model_spec": model.medkd_spec.to_dict(), "state_dict": model.state_dict(),
                     "preprocessing": {"plan": plan.to_dict(), "patch_size": patch},
                     "labels": dict(dataset.labels)}, path)
    return path


@pytest.mark.parametrize("mode,patch,spacing", [("2d", [32, 32], None), ("3d", [16, 32, 32], None),
                                                ("2d", [32, 32], [2.5, 1.5, 1.5]), ("3d", [16, 32, 32], [3.0, 1.3, 1.3])])
def test_prediction_keeps_exact_geometry(phantoms_3d, tmp_path, mode, patch, spacing):
    ckpt = _checkpoint(phantoms_3d, tmp_path / "m.pt", mode, patch, spacing)
    # give the inputs a non-trivial direction and origin too
    images = tmp_path / "images"
    for path in sorted((phantoms_3d / "imagesTs").iterdir()):
        image = sitk.ReadImage(str(path))
        image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
        image.SetOrigin((-12.5, 40.0, 3.25))
        images.mkdir(exist_ok=True)
        sitk.WriteImage(image, str(images / path.name))
    predictor = Predictor(ckpt, tta=mode == "2d")
    written = predict_folder(predictor, images, tmp_path / "out", save_probs=True)
    assert len(written) == 2
    for out in written:
        source = images / out.name.replace(".nii.gz", "_0000.nii.gz")
        seg, geo = read_image(out)
        img, src_geo = read_image(source)
        assert seg.shape == img.shape and seg.dtype == np.uint8
        assert geo == src_geo
        probs = np.load(out.with_name(out.name.replace(".nii.gz", ".npz")))["probabilities"]
        assert probs.dtype == np.float16 and probs.shape == (5, *img.shape)
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
        assert np.array_equal(probs.astype(np.float32).argmax(0), seg) or (probs.argmax(0) == seg).mean() > 0.99


def test_prediction_of_native_2d_png(phantoms_2d, tmp_path):
    ckpt = _checkpoint(phantoms_2d, tmp_path / "m.pt", "2d", [32, 32])
    written = predict_folder(Predictor(ckpt), phantoms_2d / "imagesTs", tmp_path / "out")
    seg, _ = read_image(written[0])
    img, _ = read_image(phantoms_2d / "imagesTs" / written[0].name.replace(".png", "_0000.png"))
    assert written[0].suffix == ".png" and seg.shape == img.shape


def test_prediction_refuses_to_overwrite(phantoms_2d, tmp_path):
    ckpt = _checkpoint(phantoms_2d, tmp_path / "m.pt", "2d", [32, 32])
    predict_folder(Predictor(ckpt), phantoms_2d / "imagesTs", tmp_path / "out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        predict_folder(Predictor(ckpt), phantoms_2d / "imagesTs", tmp_path / "out")
    predict_folder(Predictor(ckpt), phantoms_2d / "imagesTs", tmp_path / "out", overwrite=True)


def test_missing_channel_is_named(tmp_path):
    folder = tmp_path / "in"
    geo = __import__("medkd.data.io", fromlist=["Geometry"]).Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    write_image(np.zeros((8, 8), np.uint8), geo, folder / "a_0000.png")
    with pytest.raises(FileNotFoundError, match="a_0001"):
        group_channel_files(folder, 2)


def test_nan_image_is_named(phantoms_3d, tmp_path):
    """Before: "image contains NaN or Inf voxels", naming no file."""
    ckpt = _checkpoint(phantoms_3d, tmp_path / "m.pt", "3d", [16, 32, 32])
    folder = tmp_path / "in"
    for path in sorted((phantoms_3d / "imagesTs").iterdir()):
        image, geometry = read_image(path)
        write_image(image.astype(np.float32), geometry, folder / path.name)
    bad = sorted(folder.iterdir())[1]
    image, geometry = read_image(bad)
    image[2, 3, 4] = np.nan
    write_image(image, geometry, bad)
    with pytest.raises(ValueError, match=f"{bad}: image holds 1 NaN/Inf voxel"):
        predict_folder(Predictor(ckpt), folder, tmp_path / "out")


def test_extra_channel_files_for_a_one_channel_model_are_refused(tmp_path):
    """Before: a_0001.png was silently ignored by a 1-channel model."""
    folder = tmp_path / "in"
    geo = Geometry.default(2)
    for name in ("a_0000.png", "a_0001.png", "b_0000.png"):
        write_image(np.zeros((8, 8), np.uint8), geo, folder / name)
    with pytest.raises(ValueError, match=r"a_0001.png: the model takes 1 channel\(s\) \(_0000\) but case a has"):
        group_channel_files(folder, 1)
