"""speechchat.model: audio front-end, audio encoders, the frozen LLM, mixed-turn prompts, checkpoints."""
