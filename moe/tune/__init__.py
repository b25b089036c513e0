"""Fine-tuning pretrained weights: init_from, trainable/frozen split (full or LoRA), chat
and preference data, DPO, LoRA merge and PEFT export, and head-to-head comparison."""
