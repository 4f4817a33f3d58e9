"""mlfm-scale: distributed pretraining, distillation and evaluation of Masked Language Flow Models."""

__version__ = "0.1.0"
