"""Training: the MLFM objective on the model, and (later) the loop, optimizer, EMA and checkpoints."""
