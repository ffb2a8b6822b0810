"""Metrics for the playground, one registry, each honest about the weights it needs.

Two kinds:
- imperceptibility, `fn(clean, protected) -> float`: protected vs clean images ([3,H,W] lists, [0,1]).
- efficacy, `fn(generations, references, prompt) -> float`: generations after an attack vs the subject's clean
  reference photos (and the prompt they were generated from).

A metric whose pretrained weights are missing raises `MetricUnavailable` with the reason and how to provide the
weights (a local folder, or the cache file that the library would have downloaded). It never falls back to
random weights. post_attack_loss, the headline efficacy number, needs an adapter and lives in attacks/; the grid
runner records it beside these.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from ldu import metrics as base
from ldu.registry import Entry, NoParams, Registry


class MetricUnavailable(RuntimeError):
    """The metric's weights or package are missing here; the message says what and how to provide them."""


class NothingToMeasure(MetricUnavailable):
    """The metric works here, but these images give it nothing to measure (no face in them, say)."""


@dataclass(frozen=True, kw_only=True)
class Metric(Entry):
    kind: str  # "imperceptibility" | "efficacy"
    # Imperceptibility: is a higher value less visible? Efficacy: does a higher value mean the attack learned the
    # subject worse (better protection)? None where it depends (CLIP-T).
    higher_is_better: bool | None = None
    params: type = NoParams


metrics: Registry = Registry("metric", Metric)


def register(m: Metric) -> Metric:
    return metrics.register(m)


def get_metric(name: str) -> Metric:
    return metrics.entry(name)


def measure(name: str, *args) -> float | str:
    """The metric's value, or the string 'unavailable: <reason>' (never an exception for missing weights)."""
    try:
        return float(get_metric(name).fn(*args))
    except MetricUnavailable as err:
        return f"unavailable: {err}"


def _stack(images) -> torch.Tensor:
    return torch.stack([im.float().cpu() for im in images])


def _hub_checkpoint(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


# ---- imperceptibility: always available ------------------------------------------------------------------
def psnr(clean, protected) -> float:
    return sum(base.psnr(c, p) for c, p in zip(clean, protected)) / len(clean)


def ssim(clean, protected) -> float:
    return sum(base.ssim(c, p) for c, p in zip(clean, protected)) / len(clean)


def linf(clean, protected) -> float:
    return max(base.linf(p.float() - c.float()) for c, p in zip(clean, protected))


def rms(clean, protected) -> float:
    return sum(base.rms(p.float() - c.float()) for c, p in zip(clean, protected)) / len(clean)


# ---- imperceptibility: pretrained -------------------------------------------------------------------------
ALEXNET = "alexnet-owt-7be5be79.pth"


def lpips_distance(clean, protected) -> float:
    """LPIPS (Zhang et al. 2018) with the AlexNet backbone: its linear layers ship with the lpips package, the
    AlexNet weights come from torchvision's cache."""
    if not _hub_checkpoint(ALEXNET).exists():
        raise MetricUnavailable(f"LPIPS needs torchvision's AlexNet weights: put {ALEXNET} in {_hub_checkpoint(ALEXNET).parent} "
                                "(torchvision.models.alexnet(weights='DEFAULT') downloads it on a machine with access)")
    import lpips  # deferred: the optional metrics load their libraries only when asked (here and below)

    model = _cached("lpips", lambda: lpips.LPIPS(net="alex", verbose=False).eval())
    with torch.no_grad():
        out = [float(model(c[None] * 2 - 1, p[None] * 2 - 1)) for c, p in zip(clean, protected)]
    return sum(out) / len(out)


INCEPTION = "weights-inception-2015-12-05-6726825d.pth"


def _inception_available() -> None:
    if importlib.util.find_spec("torch_fidelity") is None:
        raise MetricUnavailable("FID/KID need the torch-fidelity package (pip install torch-fidelity) and its Inception weights")
    if not _hub_checkpoint(INCEPTION).exists():
        raise MetricUnavailable(f"FID/KID need torch-fidelity's Inception weights: put {INCEPTION} in "
                                f"{_hub_checkpoint(INCEPTION).parent} (torch-fidelity downloads it on first use with network)")


def _uint8(images) -> torch.Tensor:
    return (_stack(images).clamp(0, 1) * 255).round().to(torch.uint8)


KID_MIN, FID_MIN = 4, 50


def kid(a, b) -> float:
    """Kernel Inception Distance between two image sets (preferred to FID for 4-16 images): the mean over 10
    random subsets of half the smaller set (subsets of the whole set would all be the same one)."""
    n = min(len(a), len(b))
    if n < KID_MIN:
        raise MetricUnavailable(f"too few images (need >= {KID_MIN} per set, got {n})")
    _inception_available()
    from torchmetrics.image.kid import KernelInceptionDistance

    m = KernelInceptionDistance(subset_size=n // 2, subsets=10, reset_real_features=True)
    m.update(_uint8(a), real=True)
    m.update(_uint8(b), real=False)
    return float(m.compute()[0])


def fid(a, b) -> float:
    """Frechet Inception Distance; below FID_MIN images per set its bias swamps any difference (use kid)."""
    n = min(len(a), len(b))
    if n < FID_MIN:
        raise MetricUnavailable(f"too few images (need >= {FID_MIN} per set, got {n}; kid works from {KID_MIN})")
    _inception_available()
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=2048)
    m.update(_uint8(a), real=True)
    m.update(_uint8(b), real=False)
    return float(m.compute())


# ---- efficacy -------------------------------------------------------------------------------------------
def thumb_distance(generations, references, prompt=None) -> float:
    """Weight-free and crude: L2 distance of 8x8 colour thumbnails of the generations to the references' mean.
    Lower = more like the subject. A stand-in where CLIP/DINO weights are missing, not a replacement."""
    g, r = base.thumbnails(generations), base.thumbnails(references).mean(0)
    return float((g - r).norm(dim=1).mean())


def _local_model(env: str, hub_id: str, loader):
    """A model from $env (a local folder) or from the Hugging Face cache, never downloaded here."""
    source = os.environ.get(env) or hub_id
    try:
        return _cached(source, lambda: loader(source))
    except Exception as err:  # noqa: BLE001  (missing files show up as OSError, ValueError, ... depending on the library)
        raise MetricUnavailable(f"needs {hub_id} (set {env} to a local folder of it, or cache it with "
                                f"`hf download {hub_id}` on a machine with access): {type(err).__name__}") from None


CLIP_ID, DINO_ID = "openai/clip-vit-base-patch32", "facebook/dino-vits16"


def _clip():
    from transformers import CLIPModel, CLIPProcessor

    return _local_model("LDU_CLIP_MODEL", CLIP_ID, lambda s: (CLIPModel.from_pretrained(s, local_files_only=True).eval(),
                                                               CLIPProcessor.from_pretrained(s, local_files_only=True)))


def _embedding(out) -> torch.Tensor:
    """transformers 5's get_*_features return a ModelOutput whose pooler_output is the projected embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def _clip_image_features(images):
    model, proc = _clip()
    pixels = proc(images=[im.clamp(0, 1) for im in images], return_tensors="pt", do_rescale=False)["pixel_values"]
    return F.normalize(_embedding(model.get_image_features(pixel_values=pixels)), dim=-1)


def clip_i(generations, references, prompt=None) -> float:
    """Mean cosine similarity of CLIP image embeddings, generations vs references (DreamBooth's CLIP-I)."""
    return float((_clip_image_features(generations) @ _clip_image_features(references).T).mean())


@torch.no_grad()
def clip_t(generations, references, prompt=None) -> float:
    """Mean cosine similarity of CLIP embeddings of the generations and of their prompt (DreamBooth's CLIP-T)."""
    if not prompt:
        raise MetricUnavailable("CLIP-T needs the generation prompt")
    model, proc = _clip()
    text = proc(text=[prompt], return_tensors="pt", padding=True, truncation=True)
    t = F.normalize(_embedding(model.get_text_features(**text)), dim=-1)
    return float((_clip_image_features(generations) @ t.T).mean())


@torch.no_grad()
def dino(generations, references, prompt=None) -> float:
    """Mean cosine similarity of DINO ViT-S/16 CLS embeddings, generations vs references (DreamBooth's DINO)."""
    from transformers import AutoImageProcessor, ViTModel

    model, proc = _local_model("LDU_DINO_MODEL", DINO_ID, lambda s: (ViTModel.from_pretrained(s, local_files_only=True).eval(),
                                                                     AutoImageProcessor.from_pretrained(s, local_files_only=True)))

    def embed(images):
        pixels = proc(images=[im.clamp(0, 1) for im in images], return_tensors="pt", do_rescale=False)["pixel_values"]
        return F.normalize(model(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)

    return float((embed(generations) @ embed(references).T).mean())


@torch.no_grad()
def clip_iqa(generations, references=None, prompt=None) -> float:
    """CLIP-IQA (Wang et al. 2023): how much CLIP prefers "Good photo." to "Bad photo." for the generations."""
    model, proc = _clip()
    text = proc(text=["Good photo.", "Bad photo."], return_tensors="pt", padding=True, truncation=True)
    t = F.normalize(_embedding(model.get_text_features(**text)), dim=-1)
    probs = (100 * _clip_image_features(generations) @ t.T).softmax(-1)
    return float(probs[:, 0].mean())


def kid_generations(generations, references, prompt=None) -> float:
    return kid(references, generations)


# ---- faces (optional extra: facenet-pytorch) --------------------------------------------------------------
FACENET_WEIGHTS = "20180402-114759-vggface2.pt"


def _mtcnn():
    """facenet-pytorch's MTCNN detector; its P/R/O-Net weights ship inside the package."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError:
        raise MetricUnavailable("face metrics need facenet-pytorch: pip install facenet-pytorch --no-deps (its pins predate "
                                "torch 2.14; the code runs with the torch installed here)") from None
    return _cached("mtcnn", lambda: MTCNN(image_size=160, margin=0, post_process=True, select_largest=True, device="cpu"))


def _faces(images) -> list[torch.Tensor | None]:
    """The largest face of each image as a 160x160 whitened crop, or None where MTCNN finds none."""
    mtcnn = _mtcnn()
    pil = [Image.fromarray((im.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()) for im in images]
    return [mtcnn(p) for p in pil]


def face_detection_failure(generations, references=None, prompt=None) -> float:
    """FDFR (Anti-DreamBooth): the fraction of generations in which the face detector finds no face (MTCNN here,
    RetinaFace there). Higher = the attack made worse faces."""
    return sum(f is None for f in _faces(generations)) / len(generations)


@torch.no_grad()
def face_similarity(generations, references, prompt=None) -> float:
    """ISM (Anti-DreamBooth): mean cosine similarity of FaceNet (VGGFace2) embeddings of the faces found in the
    generations to the mean embedding of the references' faces (ArcFace there). Lower = less like the subject."""
    torch_home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    path = Path(torch_home).expanduser() / "checkpoints" / FACENET_WEIGHTS  # where facenet-pytorch looks
    _mtcnn()
    if not path.exists():
        raise MetricUnavailable(f"face similarity needs FaceNet's VGGFace2 weights: put {FACENET_WEIGHTS} in {path.parent} "
                                "(facenet-pytorch downloads it on first use with network)")
    from facenet_pytorch import InceptionResnetV1

    model = _cached("facenet", lambda: InceptionResnetV1(pretrained="vggface2").eval())
    refs = [f for f in _faces(references) if f is not None]
    gens = [f for f in _faces(generations) if f is not None]
    if not refs:
        raise NothingToMeasure("no face found in the reference photos")
    if not gens:
        raise NothingToMeasure("no face found in any generation (see face_detection_failure)")
    r = F.normalize(F.normalize(model(torch.stack(refs)), dim=-1).mean(0), dim=-1)
    return float((F.normalize(model(torch.stack(gens)), dim=-1) @ r).mean())


_MODELS: dict = {}


def _cached(key, make):
    if key not in _MODELS:
        _MODELS[key] = make()
    return _MODELS[key]


for _m in (
    Metric(name="psnr", kind="imperceptibility", fn=psnr, summary="PSNR in dB, protected vs clean (torchmetrics-equivalent, fp32)", higher_is_better=True),
    Metric(name="ssim", kind="imperceptibility", fn=ssim, summary="SSIM, protected vs clean (torchmetrics)", higher_is_better=True),
    Metric(name="linf", kind="imperceptibility", fn=linf, summary="largest pixel change, [0,1] units", higher_is_better=False),
    Metric(name="rms", kind="imperceptibility", fn=rms, summary="RMS pixel change per image, [0,1] units", higher_is_better=False),
    Metric(name="lpips", kind="imperceptibility", fn=lpips_distance, summary="LPIPS (AlexNet), protected vs clean", higher_is_better=False),
    Metric(name="kid", kind="imperceptibility", fn=kid, summary="KID between the clean and protected sets (Inception)", higher_is_better=False),
    Metric(name="fid", kind="imperceptibility", fn=fid, summary="FID between the clean and protected sets (Inception; noisy below ~50 images)", higher_is_better=False),
    Metric(name="thumb_distance", kind="efficacy", fn=thumb_distance, summary="8x8 colour-thumbnail distance of generations to the subject (weight-free, crude)", higher_is_better=True),
    Metric(name="clip_i", kind="efficacy", fn=clip_i, summary="CLIP-I: image-image similarity of generations to the subject", higher_is_better=False),
    Metric(name="clip_t", kind="efficacy", fn=clip_t, summary="CLIP-T: prompt fidelity of the generations", higher_is_better=None),
    Metric(name="dino", kind="efficacy", fn=dino, summary="DINO similarity of generations to the subject", higher_is_better=False),
    Metric(name="clip_iqa", kind="efficacy", fn=clip_iqa, summary="CLIP-IQA quality of the generations", higher_is_better=False),
    Metric(name="kid_generations", kind="efficacy", fn=kid_generations, summary="KID between generations and the subject's photos", higher_is_better=True),
    Metric(name="face_similarity", kind="efficacy", fn=face_similarity, summary="ISM: FaceNet similarity of generated faces to the subject's", higher_is_better=False),
    Metric(name="face_detection_failure", kind="efficacy", fn=face_detection_failure, summary="FDFR: fraction of generations with no face (MTCNN)", higher_is_better=True),
):
    register(_m)
