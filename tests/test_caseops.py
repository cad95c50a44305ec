"""train/caseops.py against frontier DATA_EVAL.md §2: the encode examples, the decoder's non-canonical and
malformed cases, round trips, and per-token original byte counts from a real sentencepiece tokenizer."""
import random

import pytest
import sentencepiece as spm

from train.caseops import (ALLCAPS, CAPNEXT, ESC, OPERATORS, TITLE, byte_counts, decode, encode,
                           encode_with_byte_counts, ids_and_surfaces)

T, A, C, E = TITLE, ALLCAPS, CAPNEXT, ESC

# §2.2's examples: (original, encoded).
ENCODE_EXAMPLES = [
    ("The NASA Launch", f"{T}the {A}nasa {T}launch"),
    ("iPhone", f"i{C}phone"),
    ("OpenAI", f"{T}open{C}a{C}i"),
    ("McDonald's", f"{T}mc{C}donald's"),
    ("IT'S", f"{A}it'{T}s"),
    ("A and I", f"{T}a and {T}i"),
    ("ABC123DEF", f"{A}abc123{A}def"),
    ("ÉCOLE", f"É{A}cole"),
    ("Élan", "Élan"),
    (f"x{T}y", f"x{E}{T}y"),
    ("eBay", f"e{C}bay"),
    ("ABc", f"{T}a{C}bc"),
    ("", ""),
    ("Ｆoo ß Ü", "Ｆoo ß Ü"),  # non-ASCII letters are not cased by CaseOps
    ("\ue000\ue005", "\ue000\ue005"),  # private-use characters other than the four are ordinary text
]


@pytest.mark.parametrize("original, encoded", ENCODE_EXAMPLES)
def test_encode_examples(original, encoded):
    assert encode(original) == encoded
    assert decode(encoded) == original


# Input encode never produces that still decodes. The first is §2.3's: an escaped character leaves a
# pending CAPNEXT or word mode pending. The others follow from the §2.3 rules as written.
NONCANONICAL_DECODES = [
    (f"{C}{E}{T}a", f"{T}A"),
    ("Hello", "Hello"),                  # capitals pass through; only operators add case
    (f"{T}{C}a", "A"),                   # CAPNEXT after a word mode: both ask for the same capital
    (f"{A}a{E}bc", "AbC"),               # an escaped letter stays in the ALLCAPS word, uncased
    (f"{C}{E}{E}a", f"{E}A"),
]


@pytest.mark.parametrize("encoded, original", NONCANONICAL_DECODES)
def test_noncanonical_decodes(encoded, original):
    assert decode(encoded) == original


MALFORMED = [  # (text, the character position the error names, what it says)
    (f"{C}{E}{T}{C}a", 3, "second CAPNEXT"),     # §2.3: the escape does not clear the first CAPNEXT
    (f"{T}{E}ab", 3, "inside a word follows TITLE"),  # §2.3: the escaped letter starts the word
    (f"{T}", 0, "TITLE with no word"),
    (f"ab{A}", 2, "ALLCAPS inside a word"),
    (f"x{C}", 1, "CAPNEXT with no letter"),
    (f"ab{E}", 2, "ESC at the end"),
    (f"mc{T}donald", 2, "TITLE inside a word"),
    (f"{C}{C}a", 1, "second CAPNEXT"),
    (f"{T}1", 1, "'1' follows TITLE"),
    (f"{A} x", 1, "' ' follows ALLCAPS"),
    (f"x {C}'s", 3, "\"'\" follows CAPNEXT"),
    (f"{T}{A}a", 1, "ALLCAPS follows TITLE"),
    (f"{C}{T}a", 1, "TITLE follows CAPNEXT"),
    (f"{T}{E}{T}", 2, "follows TITLE"),          # a mode before an escaped non-letter
    (f"ok {T}{E}a", 3, "TITLE with no word"),    # the escaped letter did not take the mode
]


@pytest.mark.parametrize("text, position, what", MALFORMED)
def test_malformed_raises_with_position(text, position, what):
    with pytest.raises(ValueError, match=f"at character {position}: .*{what}"):
        decode(text)


WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2009\u200a\u200b\u2028\u2029\u202f\u3000\ufeff"
CHARACTER_POOL = (
    list("abcxyzABCXYZ" * 4) + list("0123456789'.,-!?\"") + list(WHITESPACE) + list(OPERATORS) * 3
    + ["\ue000", "\ue005", "\uf8ff", "\U000f0000", "Ｆ", "ｆ", "É", "é", "ß", "Ü", "ﬁ", "e\u0301", "\x00", "\x01",
       "😀", "👍🏽", "中", "\u00ad"]
)


def random_strings(seed: int, count: int, max_length: int):
    rng = random.Random(seed)
    for _ in range(count):
        yield "".join(rng.choices(CHARACTER_POOL, k=rng.randrange(max_length + 1)))


def test_round_trip_adversarial_strings():
    for text in random_strings(seed=0, count=20_000, max_length=24):
        encoded = encode(text)
        assert decode(encoded) == text, repr(text)
        assert not any("A" <= ch <= "Z" for ch in encoded), repr(text)  # ASCII case lives in operators only


def test_round_trip_embedded_corpus():
    from train.prepare import corpus_documents

    for document in corpus_documents():
        assert decode(encode(document.text)) == document.text, document.name


# ---------------------------------------------------------------------------------------------------
# Byte counts with a real tokenizer

TRAINING_SENTENCES = [
    "The NASA Launch was delayed, said the spokesman for the agency in Washington.",
    "McDonald's and OpenAI are names; eBay and iPhone are mixed case, IT'S all caps.",
    "In 1969 the first people walked on the Moon, and 600 million watched on TV.",
    "She said: \"a double  space is collapsed by the normalizer before the pieces.\"",
    "Wikipedia articles open with a lead paragraph that names the subject in bold.",
    "Then came the State of the Union address, given by the President each year.",
]


@pytest.fixture(scope="session")
def caseops_tokenizer(tmp_path_factory):
    """A small BPE tokenizer with §1.2's options, trained on CaseOps text (ASCII only, so é, emoji and
    capitals fall back to bytes); trained once per session."""
    model_path = tmp_path_factory.mktemp("caseops_tokenizer") / "caseops_bpe.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([encode(s) for s in TRAINING_SENTENCES] * 20), model_prefix=str(model_path)[:-6],
        model_type="bpe", vocab_size=400, character_coverage=0.999, byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, hard_vocab_limit=False,
        user_defined_symbols=list(OPERATORS), pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1,
        minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(model_path))


def test_tokenizer_has_the_operators_at_ids_4_to_7(caseops_tokenizer):
    sp = caseops_tokenizer
    assert [sp.id_to_piece(i) for i in range(8)] == ["<pad>", "<s>", "</s>", "<unk>", *OPERATORS]
    assert sp.id_to_piece(8) == "<0x00>"


def test_surface_reader_agrees_with_sentencepiece(caseops_tokenizer):
    """The hand-read proto fields against sentencepiece's own accessors: immutable proto pieces where the
    version has them (0.2.0), else the offset mapping (0.2.3), whose offsets index the input text."""
    sp = caseops_tokenizer
    for text in random_strings(seed=1, count=300, max_length=40):
        encoded = encode(text)
        ids, surfaces = ids_and_surfaces(sp, encoded)
        assert ids == sp.encode(encoded)
        if hasattr(sp, "encode_as_immutable_proto"):
            pieces = sp.encode_as_immutable_proto(encoded).pieces
            assert ids == [p.id for p in pieces] and surfaces == [p.surface for p in pieces]
        else:
            mapping = sp.encode(encoded, out_type="offset_mapping")
            assert ids == mapping["ids"]
            assert surfaces == [encoded[begin:end] for begin, end in mapping["offsets"]]


def test_byte_counts_hand_cases(caseops_tokenizer):
    sp = caseops_tokenizer

    def pieces_and_counts(text):
        ids, counts = encode_with_byte_counts(sp, text)
        assert ids == sp.encode(encode(text)) and len(counts) == len(ids)
        return [sp.id_to_piece(i) for i in ids], counts

    # A capital costs its letter's byte; the operator that carries its case costs nothing.
    assert pieces_and_counts("The") == (["\ue001", "the"], [0, 3])
    ids, counts = encode_with_byte_counts(sp, "NASA and iPhone")
    assert [ids[k] for k in (0, ids.index(6))] == [5, 6] and counts[0] == counts[ids.index(6)] == 0
    assert sum(counts) == len("NASA and iPhone")

    # Byte fallback: all of a character's bytes go to its last piece.
    pieces, counts = pieces_and_counts("café")
    assert pieces[-2:] == ["<0xC3>", "<0xA9>"] and counts[-2:] == [0, 2] and sum(counts) == 5
    pieces, counts = pieces_and_counts("😀")
    assert pieces == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"] and counts == [0, 0, 0, 4]
    # NFKC: fullwidth Ｆ becomes a capital F, which is no piece; ﬁ expands to two pieces.
    assert pieces_and_counts("Ｆ") == (["<0x46>"], [3])
    assert pieces_and_counts("ﬁ") == (["f", "i"], [0, 3])

    # A collapsed interior whitespace run belongs to the piece that starts with ▁.
    pieces, counts = pieces_and_counts("a  double")
    first = next(k for k, p in enumerate(pieces) if p.startswith("▁"))
    assert counts[first] == 2 + len(pieces[first]) - 1 and sum(counts) == 9

    # A literal operator character: ESC costs nothing, the escaped character its 3 UTF-8 bytes.
    ids, counts = encode_with_byte_counts(sp, f"x{T}y")
    assert ids[1:3] == [7, 4] and counts == [1, 0, 3, 1]

    # Whitespace (as nmt_nfkc sees it) at either end, and deleted controls at the start, belong to no
    # piece; inside the text, and controls at the end, they are charged.
    assert sum(byte_counts(sp, "  \u3000\ufeff\x01\x0bHi there\u00a0\u2028\n")) == len("Hi there")
    assert sum(byte_counts(sp, "Hi\x0b")) == 3 and sum(byte_counts(sp, "Hi\x85")) == 4
    assert sum(byte_counts(sp, "a\x01\u200b \x0cb")) == len("a\x01\u200b \x0cb".encode())
    assert byte_counts(sp, "") == [] and byte_counts(sp, " \n") == []


def test_byte_counts_sum_to_the_original_bytes(caseops_tokenizer):
    """Between two letters every character is charged to some token, exactly once."""
    sp = caseops_tokenizer
    for text in random_strings(seed=2, count=2_000, max_length=40):
        text = f"a{text}z"
        ids, counts = encode_with_byte_counts(sp, text)
        assert ids == sp.encode(encode(text)) and len(counts) == len(ids)
        assert sum(counts) == len(text.encode("utf-8")), repr(text)
        escaped = False
        for i, count in zip(ids, counts):
            if escaped:  # the literal operator (plus any deleted control attached to it)
                assert count >= 3, repr(text)
                escaped = False
            elif 4 <= i <= 7:
                assert count == 0, repr(text)
                escaped = i == 7
