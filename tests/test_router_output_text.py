"""``OutputText``: incremental detokenisation with the real SmolLM2 tokenizer,
fed one token id at a time as the router receives them."""

from __future__ import annotations

import time

import pytest

from router.detokenizer import OutputText
from disagg.model.tokenizer import ModelTokenizer

STOP = "STOP"
# Before the stop string: ASCII, accents, a 3-byte euro sign, CJK and an emoji
# that the byte-level BPE splits into several byte tokens.
PLAIN = "Hello, world! The café costs 5€ — naïve 日本語 🎉 done.\nNext line:  tabs\tend"
STOP_TEXTS = ["hello worldSTOP more",           # "STOP" is one token
              "The answer is STOP now",         # " ST" + "OP"
              "x ST OP then STOP",              # a false start held back, then released
              "日本語 🎉STOP!"]                 # byte tokens right before the stop


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return ModelTokenizer.from_dir(smollm2_dir)


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text)


def eos(tok) -> tuple[int, str]:
    text = tok.special_tokens["eos_token"]
    return tok.token_to_id(text), text


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def engine_stop(tok, ids: list[int], stop: str) -> tuple[int, str]:
    """Like the engine: the number of tokens generated when ``stop`` first
    appears in the text, and the final text cut before it."""
    for k in range(1, len(ids) + 1):
        text = decode(tok, ids[:k])
        if stop in text:
            return k, text[:text.index(stop)]
    raise AssertionError(f"{stop!r} never appears")


def test_byte_tokens_really_split_characters(tok):
    """The premise of the tests below: some prefixes decode to an incomplete char."""
    ids = ids_of(tok, PLAIN)
    assert any(decode(tok, ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))


@pytest.mark.parametrize("text", [PLAIN, "日本語", "🎉🎉 ok", "€"])
def test_deltas_add_up_to_the_full_decode(tok, text):
    ids = ids_of(tok, text) + [eos(tok)[0]]        # special tokens are skipped
    out = OutputText(tok, ())
    deltas = [out.add([i]) for i in ids]
    for d in deltas:
        assert "\ufffd" not in d
    full = decode(tok, ids)
    assert "".join(deltas) + out.finish(None) == full == text
    assert out.sent == full and out.ids == ids


def test_deltas_are_prefixes_of_the_final_text_all_along(tok):
    ids = ids_of(tok, PLAIN)
    out = OutputText(tok, ())
    sent = ""
    for k, i in enumerate(ids, 1):
        sent += out.add([i])
        assert PLAIN.startswith(sent)
        text = decode(tok, ids[:k])
        if text.endswith("\ufffd"):      # the token with the partial char may wait with it
            assert text.rstrip("\ufffd").startswith(sent)
        else:
            assert sent == text          # nothing held needlessly
    assert sent == PLAIN                            # no stop strings: nothing left for finish


def test_several_ids_at_once(tok):
    ids = ids_of(tok, PLAIN)
    out = OutputText(tok, ("xyz",))
    got = "".join(out.add(ids[k:k + 3]) for k in range(0, len(ids), 3))
    assert got + out.finish(None) == PLAIN


@pytest.mark.parametrize("text", STOP_TEXTS)
def test_stop_string_held_back_until_finish(tok, text):
    """Until the token that completes the stop string, nothing past its start is
    sent; finish(final) then sends the rest of the engine's final text."""
    ids = ids_of(tok, text)
    k, final = engine_stop(tok, ids, STOP)
    out = OutputText(tok, (STOP, "!!"))
    sent = ""
    for i in ids[:k - 1]:
        delta = out.add([i])
        assert "\ufffd" not in delta
        sent += delta
        assert final.startswith(sent), (sent, final)
    assert sent + out.finish(final) == final


@pytest.mark.parametrize("text", STOP_TEXTS)
def test_stop_string_never_streamed_like_responder(tok, text):
    """As ``Responder.render`` does it: add() each event's ids, end() the finishing one."""
    ids = ids_of(tok, text)
    k, final = engine_stop(tok, ids, STOP)
    out = OutputText(tok, (STOP,))
    sent = ""
    for n, i in enumerate(ids[:k], 1):
        sent += out.end([i], final) if n == k else out.add([i])
        assert final.startswith(sent), (sent, final)
    assert sent == final


def test_finish_without_final_text_uses_the_decode(tok):
    ids = ids_of(tok, "The answer is ST")              # ends in a possible stop start
    out = OutputText(tok, (STOP,))
    sent = "".join(out.add([i]) for i in ids)
    assert not sent.endswith("ST")                     # held: "STOP" might still complete
    assert sent + out.finish(None) == "The answer is ST"
    assert out.finish(None) == ""                      # nothing twice


def test_token_text(tok):
    ids = ids_of(tok, "Hello world")
    out = OutputText(tok, ())
    assert "".join(out.token_text(i) for i in ids) == "Hello world"
    eos_id, eos_text = eos(tok)
    assert out.token_text(eos_id) == eos_text                         # special tokens kept


LONG = ("Streams of text: naïve café 5€ 日本語の文章 🎉🚀 emoji, accents àéîõü, "
        "math ∑∫√ and plain words. ")


def test_long_output_equals_the_full_decode(tok):
    """2,000+ tokens with multibyte characters, one id per event (and a stop string
    that never occurs): the deltas then the finish add up to decode(all ids)."""
    ids = ids_of(tok, LONG * 60)
    assert len(ids) >= 2000
    out = OutputText(tok, ("NEVER-SEEN",))
    sent = "".join(out.add([i]) for i in ids)
    full = tok.decode(ids, skip_special_tokens=True)
    assert full.startswith(sent) and len(full) - len(sent) <= len("NEVER-SEEN") - 1
    assert sent + out.finish(None) == full == LONG * 60


class _CountingTokenizer(ModelTokenizer):
    """The real tokenizer, counting the ids its whole-sequence ``decode`` is given."""

    decoded_ids = 0

    def decode(self, ids, skip_special_tokens=False):
        self.decoded_ids += len(ids)
        return super().decode(ids, skip_special_tokens)


def _cpu_per_token(out: OutputText, ids: list[int]) -> float:
    t0 = time.process_time()
    for i in ids:
        out.add([i])
    return (time.process_time() - t0) / len(ids)


def test_per_token_cost_does_not_grow(smollm2_dir):
    """Streaming never decodes the whole output: no full decode while adding (the old
    OutputText decoded every id on every event: 8,000 ids -> 32M ids decoded), the held
    text stays bounded, and the last 500 tokens cost about what the first 500 did
    (quadratic decoding makes them ~15x dearer at this length; 4x is the bar)."""
    tok = _CountingTokenizer.from_dir(smollm2_dir)
    ids = ids_of(tok, LONG * 240)
    assert len(ids) >= 8000
    out = OutputText(tok, ("NEVER-SEEN",))
    first = _cpu_per_token(out, ids[:500])
    _cpu_per_token(out, ids[500:-500])
    last = _cpu_per_token(out, ids[-500:])
    assert tok.decoded_ids == 0
    assert len(out._held) <= out.hold
    assert last < 4 * first + 20e-6, (first, last)
    assert out.sent + out.finish(None) == LONG * 240
    assert tok.decoded_ids == len(ids)                 # finish(None): one decode of all ids
