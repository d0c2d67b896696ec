"""LightningModules: causal-LM training, healing (LoRA/QLoRA), layerwise distillation."""
