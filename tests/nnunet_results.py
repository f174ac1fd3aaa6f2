"""A small nnU-Net v2 results folder, written the way nnU-Net writes one (plans schema of nnunetv2 2.x,
``checkpoint_final.pth`` as ``nnUNetTrainer.save_checkpoint`` saves it), with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

LABELS = {"background": 0, "organ": 1, "core": 2, "neighbour": 3, "lesion": 4}


def architecture(dims: int, residual: bool = False, features=(4, 8, 16, 16)) -> dict:
    n = len(features)
    conv = f"torch.nn.modules.conv.Conv{dims}d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dims}d"
    kwargs = {"n_stages": n, "features_per_stage": list(features), "conv_op": conv,
              "kernel_sizes": [[3] * dims] * n, "strides": [[1] * dims] + [[2] * dims] * (n - 1),
              ("n_blocks_per_stage" if residual else "n_conv_per_stage"): ([1] + [2] * (n - 1)) if residual else [2] * n,
              "n_conv_per_stage_decoder": [1 if residual else 2] * (n - 1), "conv_bias": True, "norm_op": norm,
              "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    name = "ResidualEncoderUNet" if residual else "PlainConvUNet"
    return {"network_class_name": f"dynamic_network_architectures.architectures.unet.{name}",
            "arch_kwargs": kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def _configuration(dims: int, spacing: list[float], patch: list[int], scheme: str, residual: bool) -> dict:
    return {
        "data_identifier": f"nnUNetPlans_{dims}d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": patch, "median_image_size_in_voxels": patch, "spacing": spacing,
        "normalization_schemes": [scheme], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": architecture(dims, residual), "batch_dice": True,
    }


def plans(scheme: str = "ZScoreNormalization", residual: bool = False, spacing_2d=(1.0, 1.0),
          spacing_3d=(2.5, 1.0, 1.0), transpose=(0, 1, 2)) -> dict:
    """plans.json with a 2d and a 3d_fullres configuration (and 3d_lowres inheriting from 3d_fullres)."""
    backward = [list(transpose).index(a) for a in range(3)]
    return {
        "dataset_name": "Dataset001_P2D", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [999.0, 1.0, 1.0], "original_median_shape_after_transp": [1, 64, 64],
        "image_reader_writer": "NaturalImage2DIO", "transpose_forward": list(transpose), "transpose_backward": backward,
        "configurations": {
            "2d": _configuration(2, list(spacing_2d), [64, 64], scheme, residual),
            "3d_fullres": _configuration(3, list(spacing_3d), [16, 32, 32], scheme, residual),
            "3d_lowres": {"inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres",
                          "spacing": [2.5, 2.0, 2.0], "patch_size": [16, 32, 32]},
        },
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1.2, "mean": 0.55, "median": 0.5, "min": 0.0, "percentile_00_5": 0.1,
                  "percentile_99_5": 1.0, "std": 0.2}},
    }


def dataset_json(num_training: int = 10) -> dict:
    return {"channel_names": {"0": "MRI"}, "labels": dict(LABELS), "numTraining": num_training,
            "file_ending": ".png"}


def network(plan: dict, configuration: str, seed: int, deep_supervision: bool = True) -> torch.nn.Module:
    """The fold's network built directly with dynamic-network-architectures (nnU-Net's own init)."""
    import pydoc

    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    config = plan["configurations"][configuration]
    if "architecture" not in config:
        config = {**plan["configurations"][config["inherits_from"]], **config}
    arch = config["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        kwargs[key] = pydoc.locate(kwargs[key]) if kwargs[key] is not None else None
    cls = ResidualEncoderUNet if arch["network_class_name"].endswith("ResidualEncoderUNet") else PlainConvUNet
    torch.manual_seed(seed)
    net = cls(input_channels=1, num_classes=len(LABELS), deep_supervision=deep_supervision, **kwargs)
    net.apply(net.initialize)
    return net


def checkpoint(plan: dict, configuration: str, fold: int, seed: int, mirror=(0, 1)) -> dict:
    """What ``nnUNetTrainer.save_checkpoint`` writes (numpy scalars in the logs, a torch.device in init_args)."""
    net = network(plan, configuration, seed)
    return {"network_weights": net.state_dict(), "optimizer_state": {"state": {}, "param_groups": []},
            "grad_scaler_state": None,
            "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                        "train_losses": [np.float64(0.9)], "epoch_start_timestamps": [1.0e9]},
            "_best_ema": np.float64(0.5), "current_epoch": 1,
            "init_args": {"plans": plan, "configuration": configuration, "fold": fold, "dataset_json": dataset_json(),
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": tuple(mirror)}


def make_results(root: Path, configuration: str = "2d", folds=(0, 1), plan: dict | None = None,
                 mirror=(0, 1)) -> Path:
    """``root`` as nnUNet_results/Dataset001_P2D/nnUNetTrainer__nnUNetPlans__<configuration>; returns it."""
    plan = plan or plans()
    root.mkdir(parents=True, exist_ok=True)
    (root / "plans.json").write_text(json.dumps(plan, indent=1))
    (root / "dataset.json").write_text(json.dumps(dataset_json(), indent=1))
    for fold in folds:
        (root / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint(plan, configuration, fold, seed=fold, mirror=mirror),
                   root / f"fold_{fold}" / "checkpoint_final.pth")
    return root
