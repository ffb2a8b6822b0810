"""Personalization attacks (LoRA-DreamBooth, Textual Inversion, full DreamBooth) and purifications.

Not built yet (issue: Attacks). They will consume ldu's diffusion_loss and backbones.
"""
