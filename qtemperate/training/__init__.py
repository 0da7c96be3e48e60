"""The parts of a run, each a module a newcomer can find by its name.

Below :class:`qtemperate.trainer.Trainer` (which only calls them), in dependency order:

* shared helpers — :mod:`~qtemperate.training.console` (epoch lines, progress bars),
  :mod:`~qtemperate.training.guards` (divergence, simulated kills),
  :mod:`~qtemperate.training.device`, :mod:`~qtemperate.training.seed` (seeding, RNG
  state), :mod:`~qtemperate.training.evaluate`, :mod:`~qtemperate.training.architecture`;
* :mod:`~qtemperate.training.optimizer` and :mod:`~qtemperate.training.lr_schedule`;
* :mod:`~qtemperate.training.teacher` — build, load or train the teacher, cache its logits;
* :mod:`~qtemperate.training.student` — student derivation (shared with ``qtemperate plan``);
* :mod:`~qtemperate.training.stages` — quantize / switch bits at a stage boundary;
* :mod:`~qtemperate.training.loop` — one distillation epoch;
* :mod:`~qtemperate.training.checkpointing` — progress, checkpoint save and restore.

Export-and-check lives in :mod:`qtemperate.export.check`.
"""
