"""Character tokenizer: exact round trips, specials, save/load offline."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from cispo.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer


def test_default_vocab_is_four_specials_plus_96_characters() -> None:
    tok = build_char_tokenizer()
    assert len(tok) == 100
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    for ch in "0123456789+-*= \nazAZ.,!?()":
        assert ch in DEFAULT_ALPHABET


def test_encode_decode_round_trips_every_character_of_the_alphabet() -> None:
    tok = build_char_tokenizer()
    text = DEFAULT_ALPHABET + "  12 + 7 = 19\n\nWhat is (3*4)-5?"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id  # bos is prepended, nothing appended
    assert len(ids) == len(text) + 1  # one token per character
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_characters_outside_the_alphabet_become_unk() -> None:
    tok = build_char_tokenizer(alphabet="0123456789+=")
    assert len(tok) == 4 + 12
    assert tok.encode("1+x=2", add_special_tokens=False)[2] == tok.unk_token_id


def test_save_pretrained_round_trips_through_auto_tokenizer_offline(tmp_path: Path) -> None:
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "Q: 12+7=?\nA: 19"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode(text), skip_special_tokens=True) == text
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.padding_side) == (2, 0, "left")
    batch = loaded(["ab", "abcd"], padding=True)["input_ids"]
    assert batch[0][:2] == [loaded.pad_token_id] * 2  # left padding
