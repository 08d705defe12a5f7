"""Tiny random Hugging Face models built from configs (nothing is downloaded), and mapping batches."""
from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 96


def bert(layers: int = 4, hidden: int = 32, heads: int = 4, cls=None, **kw):
    kw.setdefault("intermediate_size", 2 * hidden)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, **kw)
    return (cls or transformers.BertModel)(config)


def distilbert(layers: int = 2, dim: int = 32, heads: int = 4):
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=dim, n_layers=layers, n_heads=heads,
                                           hidden_dim=2 * dim, max_position_embeddings=64, dropout=0.0,
                                           attention_dropout=0.0)
    return transformers.DistilBertModel(config)


def gpt2(layers: int = 2, hidden: int = 32, heads: int = 4, vocab: int = VOCAB):
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                     eos_token_id=2)
    return transformers.GPT2LMHeadModel(config)


def llama(layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2, vocab: int = VOCAB, tied=False,
          **kw):
    kw.setdefault("intermediate_size", 2 * hidden)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0, **kw)
    return transformers.LlamaForCausalLM(config)


def token_batch(batch: int = 4, length: int = 10, seed: int = 0, vocab: int = VOCAB, labels: bool = False,
                pad_right: bool = True, padded: bool = True) -> dict:
    """``{"input_ids", "attention_mask"[, "labels"]}`` with sequences of different lengths (all full
    length unless ``padded``), padded with 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g) if padded else torch.full((batch,), length)
    lengths[0] = length
    pos = torch.arange(length)
    mask = pos[None, :] < lengths[:, None] if pad_right else pos[None, :] >= (length - lengths)[:, None]
    ids = ids.masked_fill(~mask, 0)
    out = {"input_ids": ids, "attention_mask": mask.long()}
    if labels:
        out["labels"] = ids.masked_fill(~mask, -100)
    return out


class TokenDataset(torch.utils.data.Dataset):
    """Map-style dataset of per-sample dicts (what a tokenized ``datasets.Dataset`` yields)."""

    def __init__(self, n: int = 32, length: int = 10, seed: int = 0, labels: bool = False, vocab: int = VOCAB,
                 padded: bool = True):
        b = token_batch(n, length, seed, vocab, labels, padded=padded)
        self.items = [{k: v[i] for k, v in b.items()} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


WORDS = ("the a cat dog bird sat ran flew on under over mat tree roof far fast slow big small red blue green "
         "quick lazy old young happy sad").split()


def tokenizer():
    """A tiny word-level tokenizer ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then WORDS), built
    locally with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, **{w: i + 5 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g)))
    return out


CHAT_SPECIAL = ("[PAD]", "<s>", "</s>", "[UNK]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def chat_tokenizer(pad: bool = True, eos: bool = True, template: bool = True):
    """A tiny word-level tokenizer for chat data ([PAD]=0, <s>=1 (BOS, added before a single
    sequence), </s>=2 (EOS), [UNK]=3, role markers and <|end|> 4-7, then WORDS), with a chat template
    whose turns end with <|end|>; built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {**{t: i for i, t in enumerate(CHAT_SPECIAL)}, **{w: i + len(CHAT_SPECIAL) for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", unk_token="[UNK]", pad_token="[PAD]" if pad else None,
        eos_token="</s>" if eos else None, additional_special_tokens=list(CHAT_SPECIAL[4:]))
    tok.chat_template = CHAT_TEMPLATE if template else None
    return tok
