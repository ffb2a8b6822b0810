"""Metrics, the grid runner, reports and plots.

Not built yet (issue: Evaluation). ldu.metrics already holds PSNR, SSIM, Linf and RMS.
"""
