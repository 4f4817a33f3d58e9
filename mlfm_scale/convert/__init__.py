"""Pretrained checkpoints → our model's weights under canonical names (``mlfm convert``).

    plan = plan_for("smdm", cfg.model, path)          # validated against the config; nothing read yet
    for entry in plan.entries: entry.read()           # one float32 tensor at a time

Formats: SMDM (LitGPT safetensors), LLaDA (Hugging Face directory), and the reference's MLFM adapters (its
``.pt`` with the SMDM base beside it); ``checkpoint.py`` writes the result as a step-0 checkpoint.
"""
