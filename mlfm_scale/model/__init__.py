"""The MLFM network on megatron-core: attention backends, the AdaLN layer, specs, the model, FLOPs."""
