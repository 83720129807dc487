"""Trainers: GRPO and Online DPO on transformers.Trainer, with the engine as the rollout placement."""
