"""mcimage: the image branch (MultiCrafter and One-for-All on FLUX) on the shared idcrafter core."""

__version__ = "0.1.0"
