"""A character-level tokenizer the project builds itself, for tiny models and offline tests.

One token per character of a fixed alphabet, plus four special tokens: ids 0..3 are `<pad>`,
`<bos>`, `<eos>` (ends a completion) and `<unk>` (any character outside the alphabet). Encoding
with `add_special_tokens=True` (the default) prepends `<bos>`; no `<eos>` is appended, because
prompts are open-ended and the model writes the `<eos>`.

It is a `transformers.PreTrainedTokenizerFast` built with the `tokenizers` library, so
`save_pretrained` / `AutoTokenizer.from_pretrained` work offline. It leaves out normalisation,
merges and chat templates: tasks format their own prompts.

    tok = build_char_tokenizer()
    ids = tok.encode("12+7=")           # [bos, '1', '2', '+', '7', '=']
    tok.decode(ids, skip_special_tokens=True) == "12+7="
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"
"""96 characters: digits, letters, ASCII punctuation (includes + - * =), space and newline."""


def build_char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """Build a character tokenizer: ids 0..3 are the special tokens, then one id per character.

    Args:
        alphabet: the characters to give ids to, in id order (duplicates are dropped);
            `DEFAULT_ALPHABET` when None. Characters outside it encode as `<unk>`.
    """
    chars = list(dict.fromkeys(DEFAULT_ALPHABET if alphabet is None else alphabet))
    if not chars:
        raise ValueError("alphabet must contain at least one character")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)

    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split every character (newline included, which "." would miss) into its own piece.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse concatenates pieces; the default decoder would join them with spaces.
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    core.add_special_tokens(list(SPECIAL_TOKENS))

    # The constructor takes **kwargs and is unannotated in transformers.
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",  # generation pads on the left, see engine/sampler.py
        clean_up_tokenization_spaces=False,
    )
