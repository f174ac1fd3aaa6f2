"""The files of a bundle written by ``medkd export``, its plan and their checksums (no PyTorch).

A bundle is one folder::

    model.onnx   the network: input ``image`` (B, C, *spatial) float32 -> output ``logits`` (B, K, *spatial)
    plan.json    everything else the predictor needs (below) and the SHA-256 of every other file
    README.md    the model card

``plan.json`` keys: ``format`` (:data:`BUNDLE_FORMAT`), ``medkd_version``, ``source`` (checkpoint,
step), ``model`` (file, opset, input/output names, registry spec, parameters, MACs, largest stride,
``precision`` - one of :data:`PRECISIONS`, fp32 when absent - and for int8/fp16 ``quantization``: how
it was converted, on which calibration cases, and its agreement with the fp32 model),
``preprocessing`` (the checkpoint's :class:`medkd.data.preprocess.PreprocessingPlan`, unchanged),
``inference`` (patch size, overlap, blending, whole-slice choice), ``labels``, ``postprocessing``
(the steps ``medkd predict`` applies for the checkpoint, or ``null``), ``postprocessing_record``,
``latency``, ``files`` ({name: {"bytes", "sha256"}}) and ``plan_sha256``, the SHA-256 of the
plan itself without that key (canonical JSON), so an edited plan is refused too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["BUNDLE_FORMAT", "CARD_FILE", "MODEL_FILE", "PLAN_FILE", "PRECISIONS", "BundleError", "plan_digest",
           "read_bundle", "seal_plan", "sha256_of_file"]

BUNDLE_FORMAT = "medkd-bundle-v1"
PLAN_FILE = "plan.json"
MODEL_FILE = "model.onnx"
CARD_FILE = "README.md"
#: numeric precisions of ``model.onnx`` (input and output are float32 in all of them)
PRECISIONS = ("fp32", "int8", "fp16")
#: top-level plan keys the predictor reads
REQUIRED_KEYS = ("model", "preprocessing", "inference", "labels", "postprocessing", "files", "plan_sha256")


class BundleError(ValueError):
    """A bundle is missing, incomplete, altered or unusable; the message names the file."""


def sha256_of_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-sized blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def plan_digest(plan: dict[str, Any]) -> str:
    """SHA-256 of ``plan`` without its ``plan_sha256`` key, as canonical JSON (sorted keys)."""
    body = {key: value for key, value in plan.items() if key != "plan_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def seal_plan(plan: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``plan`` plus ``files`` (size and SHA-256 of every file in ``folder`` but the plan) and ``plan_sha256``."""
    files = {path.name: {"bytes": path.stat().st_size, "sha256": sha256_of_file(path)}
             for path in sorted(Path(folder).iterdir()) if path.is_file() and path.name != PLAN_FILE}
    sealed = {**plan, "files": files}
    sealed["plan_sha256"] = plan_digest(sealed)
    return sealed


def _load_plan(path: Path) -> dict[str, Any]:
    if not path.parent.is_dir():
        raise BundleError(f"{path.parent}: no such bundle folder (make one with `medkd export`)")
    if not path.is_file():
        raise BundleError(f"{path}: missing; {path.parent} is not a complete medkd bundle (made by `medkd export`)")
    try:
        plan = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BundleError(f"{path}: unreadable ({err})") from None
    if not isinstance(plan, dict) or plan.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a medkd bundle plan (missing format={BUNDLE_FORMAT!r})")
    missing = [key for key in REQUIRED_KEYS if key not in plan]
    if missing:
        raise BundleError(f"{path}: missing key(s) {', '.join(missing)}")
    if plan_digest(plan) != plan["plan_sha256"]:
        raise BundleError(f"{path}: altered since export (its content no longer matches plan_sha256)")
    return plan


def read_bundle(folder: str | Path) -> dict[str, Any]:
    """The verified plan of the bundle in ``folder``.

    Raises :class:`BundleError` naming the file when ``plan.json`` is missing, unreadable, not a bundle
    plan or edited, or when a file it lists (``model.onnx``, ``README.md``) is missing or its size or
    SHA-256 differs from the plan's record.
    """
    folder = Path(folder)
    plan = _load_plan(folder / PLAN_FILE)
    files = plan["files"]
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise BundleError(f"{folder / PLAN_FILE}: lists no {MODEL_FILE}")
    for name, record in files.items():
        path = folder / name
        if Path(name).name != name:
            raise BundleError(f"{folder / PLAN_FILE}: file name {name!r} leaves the bundle folder")
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle (listed in {PLAN_FILE})")
        size = path.stat().st_size
        if size != record.get("bytes"):
            raise BundleError(f"{path}: altered since export ({size} bytes, {PLAN_FILE} records {record.get('bytes')})")
        if sha256_of_file(path) != record.get("sha256"):
            raise BundleError(f"{path}: altered since export (SHA-256 differs from the one in {PLAN_FILE})")
    return plan
