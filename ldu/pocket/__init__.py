"""The pocket backbone: a trained miniature Stable Diffusion shipped in assets/pocket (see train.py and check.py)."""
