"""The network: a frozen timm ViT with per-task adapters (lora.py), their gate (gate.py), a growing head."""
