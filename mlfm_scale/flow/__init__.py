"""The MLFM math as pure tensor functions: γ and mask-ratio schedules, the bridge, the objective."""
