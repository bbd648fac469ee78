"""Hydra launcher plugin: every job of a multirun sweep as one Ray task (``hydra/launcher=ray_tasks``).

    python jobs/text_to_3d.py -m sds.guidance.recon_std_rescale=0,0.3,0.5 seed=0,1 hydra/launcher=ray_tasks

Found by Hydra's plugin scan of the ``hydra_plugins`` namespace package (no ``__init__.py`` in
``platform/hydra_plugins/``); the launcher and its config are in :mod:`.ray_tasks_launcher`,
the Ray side (imported only when a sweep launches) in ``_core``.
"""
