"""Tiny HuggingFace models with random weights (offline) for the parity tests."""

import torch
import transformers  # a test dependency (Makefile DEPS)

transformers.logging.set_verbosity_error()


def gpt2(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()


def llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def bert(seed=0):
    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=128,
                                                          max_position_embeddings=64)).eval()


HF_LMS = {"gpt2": gpt2, "llama": llama}


def left_padded_batch(vocab=97, lengths=(9, 6, 3), seed=0, pad=0):
    """Prompts of the given lengths, left-padded with ``pad``: (ids, mask)."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.full((len(lengths), L), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, L - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, L - n:] = 1
    return ids, mask
