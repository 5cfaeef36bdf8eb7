"""Fine-tuning: config -> samples -> transformers' Trainer (+ peft) -> run folder."""
