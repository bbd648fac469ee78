"""Text-to-3D by multi-view score distillation (SDS) into a NeRF.

Import the submodules directly (``from mvdream_platform.sds.render import VolumeRenderer``);
this package imports nothing at load time, so importing one part never pulls in the others
(nor nerfacc, nor a diffusion model).
"""
