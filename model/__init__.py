"""speechchat.model: audio front-end, encoders, the frozen LLM, mixed-turn prompts, checkpoints."""
