"""Yokai Pipeline: anime episodes -> per-character LoRA datasets and training.

The library is pure processing logic and never imports prefect; see flows/ and tasks/.
"""

__version__ = "0.1.0"
