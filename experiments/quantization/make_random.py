"""A random-init model of a config's size as a Hugging Face folder (through the converter),
for the quantization table's third row:

    python experiments/quantization/make_random.py configs/bench-moe.yaml runs/quant/bench-moe-random
"""

import sys
import tempfile
from pathlib import Path

import jax

from moe import cli
from moe import config as config_lib
from moe.checkpoint.params import save_params
from moe.model import init


def main(config: str, out: str) -> None:
    cfg = config_lib.load(config)
    with tempfile.TemporaryDirectory() as tmp:
        save_params(Path(tmp) / "params", init(cfg.model, jax.random.key(cfg.seed)))
        (Path(tmp) / "config.yaml").write_text(config_lib.dump(cfg))
        assert cli.main(["convert", "to-hf", tmp, out, "--tokenizer", cfg.data.tokenizer]) == 0


if __name__ == "__main__":
    main(*sys.argv[1:])
