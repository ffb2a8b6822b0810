"""The minimal fine-tuning machinery protection and attacks share: peft LoRA on a model, and one training step.

ASPL's surrogate (a protection) and the LoRA-DreamBooth attack both call `add_lora` and `train_step`; the
attacks package builds data handling, saving and the other attacks around them. The training loss is
`diffusion_loss` with one fresh (t, eps) draw per sample, exactly what the attacker minimises.
"""

from __future__ import annotations

import torch

from .losses import diffusion_loss, make_draws

# diffusers' DreamBooth-LoRA example: the attention projections of the UNet, and of the CLIP text encoder.
UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW, fused into one kernel per step where torch has one for the parameters' device (CPU, CUDA).

    The same update as the default per-tensor loop up to float rounding; the loop is what costs on a CPU: fused, a
    full DreamBooth step of pocket's UNet (324 tensors) is 1.1-1.3x faster (docs/RESULTS.md, "Fused AdamW").
    `params` as torch.optim takes them: tensors, or groups of them.
    """
    params = list(params)
    tensors = [t for group in params for t in (group["params"] if isinstance(group, dict) else [group])]
    fused = all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)
    return torch.optim.AdamW(params, fused=True if fused else None, **kwargs)


def forked_rng(device: torch.device):
    """A block whose draws from the global RNGs (CPU, and this CUDA device) are undone on exit."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets, adapter_name: str, seed: int) -> list[torch.nn.Parameter]:
    """Add a peft LoRA adapter (Gaussian init, seeded without touching the global RNG); returns its parameters in fp32.

    The base weights stay frozen; LoRA weights train in fp32 even when the model runs in bf16/fp16
    (as diffusers' training scripts do with cast_training_params).
    """
    from peft import LoraConfig, inject_adapter_in_model  # deferred: peft takes seconds to import; `import ldu` stays light

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    with forked_rng(next(model.parameters()).device):
        torch.manual_seed(seed)
        if hasattr(model, "delete_adapters"):  # diffusers models
            model.add_adapter(config, adapter_name=adapter_name)
        else:  # transformers 5's add_adapter needs peft >= 0.22; peft's own injection does the same with 0.21
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
    params = [p for n, p in model.named_parameters() if "lora_" in n and f".{adapter_name}." in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def remove_lora(model: torch.nn.Module, adapter_name: str) -> None:
    """Delete an adapter added by add_lora, leaving the model as it was.

    Deleting an adapter leaves peft's wrapper layers behind (`...to_q.base_layer.weight`): once no adapter
    is left they are unwrapped too, so a later copy or save_pretrained of the model has the original keys.
    """
    from diffusers.utils import recurse_remove_peft_layers  # deferred, as in add_lora

    if hasattr(model, "delete_adapters"):  # diffusers models
        model.delete_adapters(adapter_name)
    else:  # transformers models: our adapter is the only one (delete_adapter would need peft >= 0.22)
        model.peft_config.pop(adapter_name, None)
    if not getattr(model, "peft_config", None):
        recurse_remove_peft_layers(model)
        if hasattr(model, "peft_config"):
            del model.peft_config
        if hasattr(model, "_hf_peft_config_loaded"):
            model._hf_peft_config_loaded = False


def grad_scaler(backbone):
    """A GradScaler when the backbone runs in fp16 on a GPU (small gradients underflow in fp16), else None."""
    if backbone.device.type == "cuda" and backbone.dtype == torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


def min_snr_weights(backbone, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights of timesteps t (diffusers.training_utils.compute_snr gives the SNR)."""
    from diffusers.training_utils import compute_snr  # deferred: training_utils imports more than the attacks need

    snr = compute_snr(backbone.scheduler, t.cpu())
    capped = torch.clamp(snr, max=gamma)
    if backbone.prediction_type == "v_prediction":
        return capped / (snr + 1)
    # a zero-terminal-SNR schedule's last step has SNR 0: 0/0 there; weight it 1, as public SD training scripts do
    return torch.where(snr > 0, capped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


def train_step(backbone, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, latents: torch.Tensor,
               cond: torch.Tensor, generator: torch.Generator, weights: torch.Tensor | None = None,
               max_grad_norm: float | None = 1.0, scaler=None, snr_gamma: float | None = None) -> float:
    """One optimiser step on the diffusion loss of `latents` (scaled) under `cond`, with a fresh draw per sample.

    weights [B] (optional): the loss is sum(weights * per-sample loss) instead of the mean (prior preservation:
    1/n for the n instance samples, prior_loss_weight/n for the n class samples). snr_gamma (optional): Min-SNR
    weighting (Hang et al. 2023, diffusers' `--snr_gamma`): each sample's loss times min(SNR_t, gamma) / SNR_t
    (epsilon) or / (SNR_t + 1) (v), so the nearly clean timesteps, whose loss is largest, do not swamp the noisy
    ones that set an image's layout. Returns the loss as a float.
    """
    draws = make_draws(1, latents.shape[0], tuple(latents.shape[1:]), backbone.num_train_timesteps, generator=generator)
    per_sample = diffusion_loss(backbone, latents, cond, draws, reduction="none")
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(backbone, draws.t[0], snr_gamma).to(per_sample)
    loss = per_sample.mean() if weights is None else (per_sample * weights.to(per_sample)).sum()
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
    else:  # fp16: scale the loss, unscale before clipping, skip steps with inf/NaN gradients
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    return float(loss.detach())


def learn_token(backbone, latents: torch.Tensor, prompt: str, steps: int, lr: float, generator: torch.Generator,
                token: str = "sks") -> torch.Tensor:
    """Textual Inversion in miniature (Gal et al. 2023): a shift of the embedding of `token` in `prompt`, learned with
    the diffusion loss on `latents` (scaled, [B,C,h,w]); returns the prompt's conditioning [1,77,D] with it, no grad.
    The text encoder's own weights are untouched (the shift is added by a forward hook, removed on exit)."""
    ids = backbone.token_ids([prompt])
    token_ids = torch.tensor(backbone.tokenizer.encode(token, add_special_tokens=False), device=ids.device)
    where = torch.isin(ids, token_ids)
    if not where.any():
        raise ValueError(f"the prompt {prompt!r} does not contain the token {token!r} to learn")
    embedding = backbone.text_encoder.get_input_embeddings()
    shift = torch.zeros(embedding.weight.shape[1], device=ids.device, requires_grad=True)
    hook = embedding.register_forward_hook(lambda module, args, out: out + where[..., None].to(out) * shift.to(out))
    try:
        opt = torch.optim.Adam([shift], lr=lr)
        for _ in range(steps):
            cond = backbone.text_encoder(ids)[0]
            draws = make_draws(1, latents.shape[0], tuple(latents.shape[1:]), backbone.num_train_timesteps, generator=generator)
            loss = diffusion_loss(backbone, latents, cond.expand(latents.shape[0], -1, -1), draws)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            return backbone.text_encoder(ids)[0].float()
    finally:
        hook.remove()
