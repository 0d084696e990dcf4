"""Evaluation metrics: generator quality (``fid``: FID/KID via torch-fidelity), detection metrics
(``detection``) and group statistics (``stats``)."""
