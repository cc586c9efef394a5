"""Thin adapters that put gradstats into the training stacks people already use.

* :mod:`gradstats.integrations.lightning` — PyTorch Lightning callbacks (the scaler; a Fisher
  collected at the end of training).
* :mod:`gradstats.integrations.hf` — Hugging Face ``Trainer`` callbacks (the same two).
* :mod:`gradstats.integrations.sb3` — stable-baselines3 (PPO, A2C).

Each module imports its framework lazily: importing it without the framework installed raises an
``ImportError`` that says what to install.
"""
