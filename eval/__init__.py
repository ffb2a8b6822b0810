"""Evaluation: metrics (eval.metrics), the grid runner (eval.grid, `python -m eval run CONFIG --out DIR`), reports
(eval.report), the app's comparison functions (eval.compare) and efficacy experiments (eval.efficacy)."""
