"""Plug qtemperate into training frameworks users already have.

* :mod:`qtemperate.integrations.lightning` — :class:`TemperateDistillation`, a
  Lightning callback that adds Temperate distillation, the temperature schedule and
  the bit-width stages to a user's ``LightningModule`` (``pip install
  'qtemperate[lightning]'``).

Nothing here is imported by ``import qtemperate``: each integration imports its
framework only when it is imported itself.
"""
