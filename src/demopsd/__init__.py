"""On-policy self-distillation of language models (DemoPSD, SDPO, OPSD, GRPO)."""
