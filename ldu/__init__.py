"""LDU Playground core: backbones, DDIM helpers, losses, the protect() contract and the protection methods.

    from ldu import load_backbone, load_images, protect
    bb = load_backbone("tiny")
    result = protect(load_images(["photo.jpg"]), bb, method="ldu", params={"iterations": 8})
    result.save("out/")
"""

from .backbone import Backbone, BackboneError, load_backbone
from .budget import project
from .ddim import ddim_denoise, ddim_invert, ddim_timesteps
from .io import ImageLoadError, LoadedImage, load_images, save_png
from .losses import Draws, attacker_loss, diffusion_loss, make_draws
from .methods import Cancelled, Method, get_method, methods, register
from .protect import ProtectResult, protect
from .version import __version__, code_version

__all__ = [
    "Backbone", "BackboneError", "Cancelled", "Draws", "ImageLoadError", "LoadedImage", "Method", "ProtectResult",
    "__version__", "attacker_loss", "code_version", "ddim_denoise", "ddim_invert", "ddim_timesteps", "diffusion_loss",
    "get_method", "load_backbone", "load_images", "make_draws", "methods", "project", "protect", "register", "save_png",
]
