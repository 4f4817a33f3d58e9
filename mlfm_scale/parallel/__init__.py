"""Process groups and parallel layouts (megatron-core parallel_state), kept at the edges of the math."""
