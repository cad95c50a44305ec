"""CaseOps: the lossless case transform of the challenge's #1 record (frontier DATA_EVAL.md §2).

encode() lowercases ASCII letters and records their case with four private-use operator characters, so a
tokenizer sees one spelling per word; decode() is its exact inverse. encode_with_byte_counts() tokenizes
encoded text and charges each token the original UTF-8 bytes it stands for (§2.5), the per-token byte
sidecar that bits per byte is computed from.
"""
from __future__ import annotations

import re

TITLE = "\ue001"    # the next word is Capitalized (or a single capital)
ALLCAPS = "\ue002"  # the next word is ALL CAPS
CAPNEXT = "\ue003"  # the next letter is a capital (mixed-case words such as iPhone)
ESC = "\ue004"      # the next character is literal (escapes operator characters in the source text)
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
OPERATOR_NAMES = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}

_ASCII_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# What encode rewrites: a maximal run of ASCII letters holding a capital, or an operator character.
# All-lowercase runs and every other character pass through untouched, so the regex skips them.
_CASED_RUN_OR_OPERATOR = re.compile("(?<![A-Za-z])[A-Za-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")


def _encode_match(match: re.Match) -> str:
    word = match.group()
    if word in OPERATORS:
        return ESC + word
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + word.lower()
    # TITLE for a leading capital, CAPNEXT before every later one. A Capitalized word or a single
    # capital thus becomes TITLE + lowercase, §2.2's title rule.
    head = TITLE + word[0].lower() if word[0].isupper() else word[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def encode(text: str) -> str:
    """The CaseOps form of text: ASCII letters lowercased, their case carried by the operators (§2.2)."""
    return _CASED_RUN_OR_OPERATOR.sub(_encode_match, text)


class _Decoder:
    """The §2.3 state machine. Its state carries from one feed() to the next, so a text can be fed in
    pieces (token surfaces) and each piece's output is what that piece stands for."""

    def __init__(self):
        self.escape = False      # the next character is literal
        self.mode = None         # TITLE or ALLCAPS waiting for the next word
        self.mode_at = -1
        self.capnext = False     # the next letter is a capital
        self.capnext_at = -1
        self.in_word = False     # the last character was an ASCII letter
        self.allcaps = False     # inside a word that ALLCAPS started

    def feed(self, text: str, offset: int = 0) -> str:
        """Decode the next part of the text; offset is its position in the whole, for error messages."""
        out = []
        for position, char in enumerate(text, offset):
            if self.escape:
                if self.mode is not None and char not in _ASCII_LETTERS:
                    raise self._error(position, f"escaped {char!r} follows {OPERATOR_NAMES[self.mode]} "
                                                f"(at {self.mode_at}), which needs a letter")
                # An escaped character leaves a pending mode or CAPNEXT pending (R1's decoder does).
                self.escape = False
                self.in_word = char in _ASCII_LETTERS
                self.allcaps = self.allcaps and self.in_word
                out.append(char)
            elif char == ESC:
                self.escape = True
            elif char == TITLE or char == ALLCAPS:
                if self.mode is not None:
                    raise self._error(position, f"{OPERATOR_NAMES[char]} follows {OPERATOR_NAMES[self.mode]} "
                                                f"(at {self.mode_at}) with no word between")
                if self.capnext:
                    raise self._error(position, f"{OPERATOR_NAMES[char]} follows CAPNEXT (at {self.capnext_at})")
                if self.in_word:
                    raise self._error(position, f"{OPERATOR_NAMES[char]} inside a word")
                self.mode, self.mode_at = char, position
            elif char == CAPNEXT:
                if self.capnext:
                    raise self._error(position, f"a second CAPNEXT (the first at {self.capnext_at})")
                self.capnext, self.capnext_at = True, position
            elif char in _ASCII_LETTERS:
                if not self.in_word:
                    if self.mode is not None or self.capnext:
                        char = char.upper()
                    self.allcaps = self.mode == ALLCAPS
                    self.mode, self.capnext, self.in_word = None, False, True
                else:
                    if self.mode is not None:
                        raise self._error(position, f"letter {char!r} inside a word follows "
                                                    f"{OPERATOR_NAMES[self.mode]} (at {self.mode_at})")
                    if self.allcaps or self.capnext:
                        char = char.upper()
                    self.capnext = False
                out.append(char)
            else:
                if self.mode is not None:
                    raise self._error(position, f"{char!r} follows {OPERATOR_NAMES[self.mode]} "
                                                f"(at {self.mode_at}), which needs a letter")
                if self.capnext:
                    raise self._error(position, f"{char!r} follows CAPNEXT (at {self.capnext_at}), "
                                                f"which needs a letter")
                self.in_word = self.allcaps = False
                out.append(char)
        return "".join(out)

    def finish(self, end: int) -> None:
        """Raise if the text ended with an operator still waiting for its character."""
        if self.escape:
            raise self._error(end - 1, "ESC at the end of the text")
        if self.mode is not None:
            raise self._error(self.mode_at, f"{OPERATOR_NAMES[self.mode]} with no word after it")
        if self.capnext:
            raise self._error(self.capnext_at, "CAPNEXT with no letter after it")

    @staticmethod
    def _error(position: int, what: str) -> ValueError:
        return ValueError(f"malformed CaseOps text at character {position}: {what}")


def decode(text: str) -> str:
    """The original of CaseOps text; ValueError, naming the position, for a sequence encode never makes."""
    decoder = _Decoder()
    out = decoder.feed(text)
    decoder.finish(len(text))
    return out


# ---------------------------------------------------------------------------------------------------
# Token surfaces: sentencepiece's serialized SentencePieceText, read with a minimal protobuf wire reader.
# sentencepiece.proto: SentencePieceText { text = 1; repeated SentencePiece pieces = 2; score = 3 } and
# SentencePiece { piece = 1; id = 2; surface = 3; begin = 4; end = 5 } (begin/end: byte offsets).
_PIECES_FIELD, _PIECE_ID_FIELD, _PIECE_SURFACE_FIELD = 2, 2, 3


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes):
    """(field number, value) for each field of one serialized protobuf message, in order: varints as int,
    length-delimited fields as bytes, fixed-width fields as their raw bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == 2:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire_type in (1, 5):  # 64- and 32-bit fixed (the float score)
            size = 8 if wire_type == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"protobuf wire type {wire_type} (field {number}) before byte {pos}: a group, "
                             f"which SentencePieceText does not use")
        yield number, value


def ids_and_surfaces(sp, text: str) -> tuple[list[int], list[str]]:
    """sp's plain encoding of text: the ids, and for each the exact substring of text sentencepiece
    attributes to it (empty for all but the last piece of a character split into several)."""
    ids, surfaces = [], []
    for number, piece in _proto_fields(sp.encode(text, out_type="serialized_proto")):
        if number != _PIECES_FIELD:
            continue
        piece_id, surface = 0, b""  # an unset field is absent (byte pieces before the last have no surface)
        for field, value in _proto_fields(piece):
            if field == _PIECE_ID_FIELD:
                piece_id = value
            elif field == _PIECE_SURFACE_FIELD:
                surface = value
        ids.append(piece_id)
        surfaces.append(surface.decode("utf-8"))
    return ids, surfaces


def encode_with_byte_counts(sp, text: str) -> tuple[list[int], list[int]]:
    """The ids of sp.encode(encode(text)) and, per id, the original UTF-8 bytes it stands for (§2.5).

    Each token's count is the UTF-8 length of its surface decoded with the state machine carried across
    surfaces: operators 0, the escaped character its own length, a letter 1. Text that belongs to no
    piece (leading and trailing whitespace as nmt_nfkc sees it) is charged to nobody.
    """
    ids, surfaces = ids_and_surfaces(sp, encode(text))
    decoder = _Decoder()
    counts = []
    position = 0  # in the surfaces run together: the encoded text less what belongs to no piece
    for k, surface in enumerate(surfaces):
        try:
            counts.append(len(decoder.feed(surface, position).encode("utf-8")))
        except ValueError as err:
            raise ValueError(f"token {k} (id {ids[k]}, surface {surface!r}): {err}") from None
        position += len(surface)
    try:
        decoder.finish(position)
    except ValueError as err:
        raise ValueError(f"after the last token: {err}") from None
    return ids, counts


def byte_counts(sp, text: str) -> list[int]:
    """Per token of sp.encode(encode(text)), the original UTF-8 bytes it stands for."""
    return encode_with_byte_counts(sp, text)[1]
