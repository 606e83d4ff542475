"""The tutorial's model, kept verbatim as the independent reference.

This is the code our users trained (`../shared/reference/tutorial.md`, plus the `import math` that
every working copy adds). tformer never runs it to serve requests: tests use it to prove that
`tformer.model.TransformerLM` loads its checkpoints strictly and reproduces its logits, and the
benchmarks use `generate_full_recompute` (the tutorial's step 5) as the baseline to beat.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class TransformerModel(nn.Module):
    def __init__(self, ntoken, ninp, nhead, nhid, nlayers, dropout=0.5):
        super(TransformerModel, self).__init__()
        self.model_type = 'Transformer'
        self.pos_encoder = PositionalEncoding(ninp, dropout)
        encoder_layers = nn.TransformerEncoderLayer(ninp, nhead, nhid, dropout)
        self.transformer_encoder = nn.TransformerEncoder(encoder_layers, nlayers)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.ninp = ninp
        self.decoder = nn.Linear(ninp, ntoken)

        self.init_weights()

    def generate_square_subsequent_mask(self, sz):
        mask = (torch.triu(torch.ones(sz, sz)) == 1).transpose(0, 1)
        mask = mask.float().masked_fill(mask == 0, float('-inf')).masked_fill(mask == 1, float(0.0))
        return mask

    def init_weights(self):
        initrange = 0.1
        self.encoder.weight.data.uniform_(-initrange, initrange)
        self.decoder.bias.data.zero_()
        self.decoder.weight.data.uniform_(-initrange, initrange)

    def forward(self, src, src_mask):
        src = self.encoder(src) * math.sqrt(self.ninp)
        src = self.pos_encoder(src)
        output = self.transformer_encoder(src, src_mask)
        output = self.decoder(output)
        return output


class PositionalEncoding(nn.Module):
    def __init__(self, d_model, dropout=0.1, max_len=5000):
        super(PositionalEncoding, self).__init__()
        self.dropout = nn.Dropout(p=dropout)

        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * -(math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer('pe', pe)

    def forward(self, x):
        x = x + self.pe[:x.size(0)]
        return self.dropout(x)


@torch.no_grad()
def generate_full_recompute(model: TransformerModel, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The tutorial's step 5, greedy: re-run the whole sequence for every new token (no cache).

    prompts: equal-length lists of ids. Returns the new ids of each prompt. This is the loop that
    tformer replaces; every token costs a full forward pass over everything before it.
    """
    model.eval()
    device = model.decoder.weight.device
    seq = torch.tensor(prompts, dtype=torch.long, device=device).T  # (T, B), seq-first
    for _ in range(max_new_tokens):
        mask = model.generate_square_subsequent_mask(seq.size(0)).to(device)
        logits = model(seq, mask)  # (T, B, V)
        seq = torch.cat([seq, logits[-1].argmax(dim=-1)[None]], dim=0)
    return seq[len(prompts[0]):].T.tolist()
