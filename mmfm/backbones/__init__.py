"""Vision backbones. Importing this package registers mmfm's timm models (BiFormer, HorNet, P2AT)."""

from mmfm.backbones import biformer, hornet, p2at  # noqa: F401  (registers with timm)
