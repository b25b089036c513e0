"""`moe bench`: the MoE layer and train step against Hugging Face (training.py) and decoding
(decode.py), measured in one run."""
