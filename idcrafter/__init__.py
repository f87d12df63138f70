"""idcrafter: multi-subject customization for Wan 2.1 video and FLUX images.

Subpackages: `core` (shared attention-regularisation core), `utils`; the video branch, training,
RL, rewards and the toy world live beside them. Import what you need from the subpackage.
"""

__version__ = "0.1.0"
