"""lm-evaluation-harness on this project's models: `moe eval SOURCE --tasks NAMES`.

`MoeLM` is an lm-eval model (a TemplateLM, so contexts and continuations are split into
tokens exactly as lm-eval's Hugging Face backend splits them) whose three request kinds run
on this project's code:
  loglikelihood          the log-probability of each continuation and whether greedy
                         decoding would produce it, from one forward pass per batch
  loglikelihood_rolling  a whole text's log-likelihood over lm-eval's disjoint windows
  generate_until         greedy `moe.infer.generate`, cut at the first stop string
Sequences are sorted by length and padded to a power of two, so a task compiles a few
shapes, not one per request. Tokenization follows a Mistral tokenizer: bos, then pieces.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

import moe.model as M
from moe import progress
from moe.config import ModelConfig
from moe.infer.decode import bucket, generate


@functools.partial(jax.jit, static_argnums=0)
def _token_scores(cfg: ModelConfig, params, tokens_bs):
    """(log p(tokens[:, 1:]) [batch, seq-1], whether each is the argmax [batch, seq-1])."""
    logits = M.apply(cfg, params, tokens_bs[:, :-1])[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    targets = tokens_bs[:, 1:]
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


class MoeLM(TemplateLM):
    def __init__(self, cfg: ModelConfig, params, sp, batch_size: int = 8, max_length: int | None = None):
        super().__init__()
        self.cfg, self.params, self.sp, self.batch_size = cfg, params, sp, batch_size
        self.max_length = max_length or (cfg.max_seq_len if cfg.sliding_window is None else 4096)

    @property
    def eot_token_id(self) -> int:
        return self.cfg.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.cfg.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.sp.encode(string)
        return ids if add_special_tokens is False else [self.cfg.bos_id, *ids]

    def tok_decode(self, tokens) -> str:
        return self.sp.decode(list(tokens))

    def _score(self, sequences: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of log p, all greedy) of the last n tokens of each (tokens, n)."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
        out: list = [None] * len(sequences)
        batches = range(0, len(order), self.batch_size)
        for first in progress.bar(batches, desc="lm-eval log-likelihoods", unit="batch"):
            group = order[first : first + self.batch_size]
            length = bucket(max(len(sequences[i][0]) for i in group))
            tokens = np.zeros((self.batch_size, length), np.int32)
            for r, i in enumerate(group):
                tokens[r, : len(sequences[i][0])] = sequences[i][0]
            logp, greedy = (np.asarray(a) for a in _token_scores(self.cfg, self.params, jnp.asarray(tokens)))
            for r, i in enumerate(group):
                seq, n = sequences[i]
                span = slice(len(seq) - 1 - n, len(seq) - 1)  # positions predicting the last n tokens
                out[i] = (float(np.sum(logp[r, span], dtype=np.float64)), bool(np.all(greedy[r, span])))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        sequences = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1) :]  # left-truncated, as lm-eval's hf backend
            sequences.append((whole, len(continuation)))
        return self._score(sequences)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),  # with bos, as the hf backend encodes it
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, target in map(lm_utils.make_disjoint_window, rolling):
                windows.append((context + target, len(target)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(windows)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in progress.bar(requests, desc="lm-eval generation", unit="request"):
            context, settings = request.args
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(settings.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-max(self.max_length - max_new, 1) :]
            new = generate(self.cfg, self.params, [ids], max_new)[0]
            text = self.tok_decode([t for t in new if t != self.cfg.eos_id])
            cut = min((text.find(s) for s in until if s in text), default=len(text))
            out.append(text[:cut])
        return out
