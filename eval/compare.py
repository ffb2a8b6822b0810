"""Does a protection survive posting? The attacker's loss on clean and protected photos, before and after what a
social network does to an upload (a resize and JPEG), under the same fixed draws."""

from __future__ import annotations

import torch

from attacks import purify
from ldu.losses import attacker_loss, make_draws
from ldu.protect import to_working


@torch.no_grad()
def survives_posting(backbone, clean, protected, prompt: str, quality: int = 85, scale: float = 0.75, seed: int = 0) -> dict:
    """Attacker loss (16 fixed draws) on clean and protected photos, before and after posting (a `scale` copy saved as
    JPEG at `quality`, scaled back up);
    `kept` is the share of the protected-minus-clean gain left after posting (NaN when there was no gain)."""

    def posted(images):  # the `posting` purification: a smaller copy saved as JPEG, scaled back up
        return purify(images, "posting", {"factor": scale, "quality": quality})

    cond = backbone.encode_prompt(prompt)
    draws = make_draws(16, len(clean), backbone.latent_shape(), backbone.num_train_timesteps, seed=seed + 4242)
    loss = {name: float(attacker_loss(backbone, to_working([im.float() for im in images], backbone), cond, draws, max_batch=32))
            for name, images in (("clean", clean), ("protected", protected), ("clean_posted", posted(clean)),
                                 ("protected_posted", posted(protected)))}
    loss["gain"] = loss["protected"] - loss["clean"]
    loss["gain_after_posting"] = loss["protected_posted"] - loss["clean_posted"]
    loss["kept"] = loss["gain_after_posting"] / loss["gain"] if loss["gain"] > 0 else float("nan")
    return loss
