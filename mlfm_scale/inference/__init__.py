"""Plain-PyTorch MLFM for exported weights (``mlfm export``): no megatron-core, DeepSpeed or process group."""
from mlfm_scale.inference.model import MLFMForInference

__all__ = ["MLFMForInference"]
