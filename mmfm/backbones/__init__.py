"""Vision backbones. Importing this package registers mmfm's timm models (BiFormer, HorNet, P2AT).

``timm_models`` builds any timm model by name for the ``backbone`` vision tokenizer and for segmentation.
Nothing here imports ``mmfm.models`` or ``mmfm.config``.
"""

from mmfm.backbones import biformer, hornet, p2at  # noqa: F401  (registers with timm)
