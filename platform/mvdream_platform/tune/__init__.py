"""Ray Tune sweeps of text-to-3D hyper-parameters (timestep annealing, CFG rescale, guidance
scale, negative prompts, seeds) over a grid of prompts.

* :mod:`.space`: the declarative search space (``conf/tune/*.yaml``) -> Ray Tune's param space,
  with validation naming the bad entry;
* :mod:`.objective`: a ground-truth-free score from the prior itself (the multi-view model's
  denoising error on the NeRF's renders at fixed timesteps, cameras and noise), plus an
  optional CLIP similarity;
* :mod:`.trial`: one trial = one :func:`mvdream_platform.sds.pipeline.run_text_to_3d` run that
  reports to Tune from its ``on_log`` hook;
* :mod:`.sweep`: the Tuner (ASHA, random/grid or Optuna search, resume of an interrupted sweep);
* :mod:`.results`: the results table, the best configuration as a text-to-3D job config.

Nothing here imports Hydra: ``jobs/tune_sds.py`` turns the composed config into a
:class:`.sweep.SweepConfig`.
"""
