"""LoRA adapters served on one base model, chosen per request (docs/lora.md)."""

from llmprod.lora.manager import AdapterInfo, LoRAManager

__all__ = ["AdapterInfo", "LoRAManager"]
