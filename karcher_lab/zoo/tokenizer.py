"""The zoo's character-level tokenizer: one token per printable ASCII character, saved for AutoTokenizer.

Vocabulary: ``<pad> <s> </s> <unk>``, newline, then the 95 printable ASCII characters (space to ``~``),
so ids 0-3 are special and every other character maps to ``<unk>``. Encoding prepends ``<s>``; decoding
concatenates characters. It is a :class:`transformers.PreTrainedTokenizerFast` built with the
``tokenizers`` library, so ``AutoTokenizer.from_pretrained(dir)`` loads it without custom code.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character-level tokenizer (the same vocabulary every time)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        padding_side="left", clean_up_tokenization_spaces=False,
    )
