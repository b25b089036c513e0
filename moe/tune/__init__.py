"""After fine-tuning: `moe lora merge` and `moe lora export` (PEFT, peft_export.py), and
`moe compare` of two models' answers (compare.py). The fine-tuning itself (init_from,
trainable/frozen split, SFT, DPO) is training (moe/training)."""
