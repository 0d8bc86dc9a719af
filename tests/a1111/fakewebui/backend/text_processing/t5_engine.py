"""Stand-in for Forge's ``backend/text_processing/t5_engine.py`` (the T5 engine of Flux, SD3.5 and
Chroma), written from its observable contract, not copied:

* ``tokenize_line(line)`` -> ``(chunks, token_count)``: the prompt's tokens (no start token,
  weights from ``parsing.parse_prompt_attention``), one chunk per ``BREAK`` part, each closed with
  ``</s>`` (``id_end`` 1) and padded with ``id_pad`` 0 to ``min_length`` (256; a longer part stays
  one longer chunk);
* ``__call__(texts)``: per line, the chunks padded to the longest, each encoded by
  ``encode_with_transformers`` (the T5 encoder's rows, no attention mask) and the emphasis applied
  (``opts.emphasis``); the lines' chunks stacked along the batch.
"""

import torch

from backend import memory_management
from backend.text_processing import emphasis, parsing
from modules.shared import opts


class PromptChunk:
    def __init__(self):
        self.tokens = []
        self.multipliers = []


class T5TextProcessingEngine:
    def __init__(self, text_encoder, tokenizer, emphasis_name="Original", min_length=256):
        self.text_encoder = text_encoder.transformer
        self.tokenizer = tokenizer
        self.emphasis = emphasis.get_current_option(opts.emphasis)()
        self.min_length = min_length
        self.id_end, self.id_pad = 1, 0

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        return self.text_encoder(input_ids=tokens.to(memory_management.text_encoder_device()))

    def tokenize_line(self, line):
        pieces = parsing.parse_prompt_attention(line, self.emphasis.name)
        ids = self.tokenize([text for text, _ in pieces])
        chunks, current, count = [], PromptChunk(), 0

        def close():
            nonlocal current, count
            current.tokens.append(self.id_end)
            current.multipliers.append(1.0)
            count += len(current.tokens)
            pad = max(0, self.min_length - len(current.tokens))
            current.tokens += [self.id_pad] * pad
            current.multipliers += [1.0] * pad
            chunks.append(current)
            current = PromptChunk()

        for toks, (text, weight) in zip(ids, pieces):
            if text == "BREAK" and weight == -1:
                close()
                continue
            current.tokens += list(toks)
            current.multipliers += [weight] * len(toks)
        if current.tokens or not chunks:
            close()
        return chunks, count

    def __call__(self, texts):
        self.emphasis = emphasis.get_current_option(opts.emphasis)()
        out = []
        for line in texts:
            chunks, _ = self.tokenize_line(line)
            width = max(len(c.tokens) for c in chunks)
            for c in chunks:
                pad = width - len(c.tokens)
                out.append(self.process_tokens([c.tokens + [self.id_pad] * pad], [c.multipliers + [1.0] * pad])[0])
        return torch.stack(out)

    def process_tokens(self, batch_tokens, batch_multipliers):
        z = self.encode_with_transformers(torch.tensor(batch_tokens))
        self.emphasis.tokens = batch_tokens
        self.emphasis.multipliers = torch.tensor(batch_multipliers).to(z)
        self.emphasis.z = z
        self.emphasis.after_transformers()
        return self.emphasis.z
