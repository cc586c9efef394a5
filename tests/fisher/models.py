"""Tiny models for the Fisher tests (float64, built from configs: nothing is downloaded)."""

from __future__ import annotations

import itertools
import warnings

import torch
from torch import nn


def hf_causal_lm(model_type: str, vocab: int = 11, **overrides) -> nn.Module:
    """A 2-layer Hugging Face causal LM of ``model_type`` with random weights, eval mode."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    sizes = {
        "gpt2": dict(n_layer=2, n_embd=8, n_head=2, n_positions=16),
        "gpt_neox": dict(
            num_hidden_layers=2,
            hidden_size=8,
            num_attention_heads=2,
            intermediate_size=12,
            max_position_embeddings=16,
        ),
    }.get(
        model_type,
        dict(
            num_hidden_layers=2,
            hidden_size=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=4,
            intermediate_size=12,
            max_position_embeddings=16,
        ),
    )
    dropout = (
        {k: 0.0 for k in ("attn_pdrop", "resid_pdrop", "embd_pdrop")}
        if model_type == "gpt2"
        else {}
    )
    settings = {k: v for k, v in (sizes | dropout | overrides).items() if v is not None}
    config = AutoConfig.for_model(model_type, vocab_size=vocab, **settings)
    config.pad_token_id = config.bos_token_id = config.eos_token_id = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    return model.double().eval()


class TokenModel(nn.Module):
    """Embedding -> Linear -> LayerNorm -> RMSNorm -> mean over positions -> Linear head."""

    def __init__(self, vocab: int = 7, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        self.lin = nn.Linear(width, 5)
        self.ln = nn.LayerNorm(5)
        self.rms = nn.RMSNorm(5)
        self.head = nn.Linear(5, classes)

    def forward(self, x):
        h = self.rms(self.ln(torch.tanh(self.lin(self.emb(x)))))
        return self.head(h.mean(1))


def mlp(sizes=(5, 7, 3), activation=nn.Tanh) -> nn.Sequential:
    layers = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers[:-1])
