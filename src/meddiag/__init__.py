"""meddiag: computer-aided diagnosis from medical images with convolutional neural networks.

The package follows the data's journey, one sub-package per stage, each importing only
the stages before it: ``data`` -> ``models`` -> ``training`` -> ``evaluation`` -> ``serving``.
"""

__version__ = "0.1.0"
