"""Control messages: every type round-trips, and ``decode`` refuses anything
malformed with ``ControlError`` only (never another exception type)."""

from __future__ import annotations

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disagg.control import messages as m
from disagg.control.messages import MESSAGES, ControlError, decode, encode

LOGPROB = [7, -0.25, [[7, -0.25], [9, -1.5]]]
SAMPLES = [
    m.Register("d0", "decode", 1, 16, "smollm2", 8192, 49152, 1000, 23040, "zmq",
               ["tcp://127.0.0.1:5555"], 1234, "localhost"),
    m.Register("p0", "prefill", 3, 16, "smollm2", 8192, 49152, 500, 23040, "shm", [], 99, "h"),
    m.Registered("d0"),
    m.Registered("d0", "router-7f3a"),
    m.Registered("d0", "router-7f3a", 41234),
    m.UplinkHello("d0", 1234),
    m.UplinkHello("d0", 1234, downlink=True),
    m.UplinkReady("d0", 1234),
    m.UplinkSwitch("d0", 1234),
    m.DownlinkSwitch("d0", 40312),
    m.Refused("d0", "model mismatch"),
    m.RegisterAgain("d0"),
    m.Heartbeat("d0", {"queued_prefill_tokens": 12, "kv_usage": 0.5}, [(128, 4, 0.02)], 10, 20),
    m.Generate("r1", [1, 2, 3], {"max_tokens": 8, "temperature": 0.0, "stop": ["x"]}, True),
    m.Generate("r1", [1, 2, 3], {"max_tokens": 8}, False, [9, 10]),
    m.KVTarget("r1", {"blocks": [1, 2], "epoch": 3}, 16, 12.5),
    m.Prefill("r1", [1, 2, 3], {"max_tokens": 8}, {"blocks": [1, 2]}),
    m.FirstToken("r1", 42, LOGPROB, 0.125, 100.25),
    INT_FLOATS := m.FirstToken("r2", 42, None, 1, 2),   # ints where floats are declared
    m.KVSent("r1", None, 0.5),
    m.KVSent("r1", "receiver gone", 0.5),
    m.Tokens("r1", [5, 6], 3, [LOGPROB, None], True, "stop", "héllo 日本", 16, "remote", 1.5, 1.0),
    m.Tokens("r1", [5], 1, [], False, None, None, 0, "", 1.5, None),
    m.Tokens("r1", [5], 1, [], False, None, None, 0, "", 1.5, None, [None, LOGPROB]),
    m.StepTokens([m.Tokens("r1", [5], 1, [LOGPROB], False, None, None, 0, "", 1.5, 1.0,
                           [None, LOGPROB]),
                  m.Tokens("r2", [6, 7], 9, [], True, "length", "ab", 16, "local", 1.5, None)]),
    m.StepTokens([]),
    m.Fallback("r1", "prefill node lost"),
    m.Abort("r1"),
    m.Drain("d0"),
    m.Deregister("d0"),
    m.Rejected("r1", "prompt too long"),
]


def frame(**data) -> bytes:
    """A raw msgpack control frame."""
    return msgpack.packb(data, use_bin_type=True)


def fields_of(msg) -> dict:
    """A message's fields as the dict that goes on the wire (without ``type``; nested
    messages as their tagged maps)."""
    return {k: v for k, v in msgpack.unpackb(encode(msg)).items() if k != "type"}


def test_samples_cover_every_message_type():
    assert {type(s).__name__ for s in SAMPLES} == set(MESSAGES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(msg):
    data = encode(msg)
    assert isinstance(data, bytes)
    back = decode(data)
    assert type(back) is type(msg) and back == msg
    if msg is INT_FLOATS:                 # decoded as floats: equal, but packed as floats
        assert back.prefill_s == 1.0 and isinstance(back.prefill_s, float)
        assert decode(encode(back)) == back
    else:
        assert encode(back) == data


def test_wire_format_is_a_map_tagged_with_the_class_name():
    assert msgpack.unpackb(encode(SAMPLES[-1])) == {"type": "Rejected", "rid": "r1",
                                                    "error": "prompt too long"}
    assert encode(m.Abort("x")) == frame(type="Abort", rid="x")


def test_encode_refuses_non_messages():
    for bad in ({"type": "Abort", "rid": "x"}, "Abort", 3, None, ControlError("x")):
        with pytest.raises(TypeError, match="not a control message"):
            encode(bad)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", b"\x81\xa1a", b"\x01\x02",
                                  frame(type="Abort", rid="x") + b"\x00"])
def test_not_msgpack(data):
    with pytest.raises(ControlError):
        decode(data)


@pytest.mark.parametrize("value", [[1, 2], "Abort", 3, None, 1.5, True, b"Abort"])
def test_not_a_map(value):
    with pytest.raises(ControlError, match="Expected `object`"):
        decode(msgpack.packb(value, use_bin_type=True))


def test_non_string_map_keys():
    with pytest.raises(ControlError):
        decode(msgpack.packb({"type": "Abort", "rid": "x", 1: 2}))


@pytest.mark.parametrize("name", [None, "", "abort", "ControlError", "Register ", "MESSAGES"])
def test_unknown_type(name):
    data = {"rid": "x"} if name is None else {"type": name, "rid": "x"}
    with pytest.raises(ControlError, match=r"required field `type`|Invalid value .* at `\$\.type`"):
        decode(frame(**data))


@pytest.mark.parametrize("name", [["Abort"], {"a": 1}])
def test_unhashable_type_value(name):
    with pytest.raises(ControlError):
        decode(frame(type=name, rid="x"))


def test_bytes_keys_are_not_field_names():
    data = msgpack.packb({b"type": "Abort", b"rid": "x"}, use_bin_type=True)
    with pytest.raises(ControlError):
        decode(data)
    data = msgpack.packb({"type": "Abort", b"rid": "x"}, use_bin_type=True)
    with pytest.raises(ControlError):
        decode(data)


def test_mixed_str_and_bytes_keys():
    data = msgpack.packb({"type": "Abort", b"rid": "x", "other": 1}, use_bin_type=True)
    with pytest.raises(ControlError):
        decode(data)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_missing_and_extra_fields(msg):
    name = type(msg).__name__
    data = fields_of(msg)
    optional = {f.name for f in msgspec.structs.fields(type(msg)) if f.required is False}
    for key in data:
        short = {k: v for k, v in data.items() if k != key}
        if key in optional:         # a field added later, with a default: older senders omit it
            assert decode(frame(type=name, **short)) == msgspec.structs.replace(
                msg, **{key: getattr(type(msg)(**short), key)})
            continue
        with pytest.raises(ControlError, match=f"missing required field `{key}`"):
            decode(frame(type=name, **short))
    with pytest.raises(ControlError, match="unknown field `extra`"):
        decode(frame(type=name, **data, extra=1))


# One candidate value of each wire type, and which annotations accept it.
CANDIDATES = {"str": "x", "int": 7, "float": 1.5, "bool": True, "ints": [1], "strs": ["x"], "empty": [],
              "lists": [[1]], "steps": [[1, 2, 0.5]], "dict": {"a": 1}, "strdict": {"a": "x"},
              "None": None, "bytes": b"x"}
ALL_LISTS = {"ints", "strs", "empty", "lists", "steps"}
ACCEPTS = {"str": {"str"}, "int": {"int"}, "float": {"int", "float"}, "bool": {"bool"},
           "list[int]": {"ints", "empty"}, "list[str]": {"strs", "empty"},
           "list[tuple[int, int, float]]": {"steps", "empty"}, "list[list | None]": {"lists", "steps", "empty"},
           "list | None": ALL_LISTS | {"None"}, "dict[str, typing.Any]": {"dict", "strdict"},
           "dict[str, int | float]": {"dict"}, "str | None": {"str", "None"},
           "float | None": {"int", "float", "None"},
           "list[list | None] | None": {"lists", "steps", "empty", "None"},
           "list[disagg.control.messages.Tokens]": {"empty"},
           "typing.Annotated[int, msgspec.Meta(ge=0, le=65535)]": {"int"}}


def type_name(t) -> str:
    """An annotation as the ACCEPTS table spells it."""
    return t.__name__ if isinstance(t, type) else repr(t)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_wrong_field_types(msg):
    name = type(msg).__name__
    for f in msgspec.structs.fields(msg):
        t = type_name(f.type)
        assert t in ACCEPTS, f"test table lacks annotation {t!r} ({name}.{f.name})"
        for kind, value in CANDIDATES.items():
            data = {**fields_of(msg), f.name: value}
            if kind in ACCEPTS[t]:
                got = getattr(decode(frame(type=name, **data)), f.name)
                assert msgpack.unpackb(msgspec.msgpack.encode(got)) == value       # tuples as lists
            else:
                with pytest.raises(ControlError, match=rf"at `\$\.{f.name}[`\[]"):
                    decode(frame(type=name, **data))


def test_an_uplink_port_outside_the_port_range_is_refused():
    for port in (-1, 65536, 2**63):
        with pytest.raises(ControlError, match="uplink_port"):
            decode(frame(type="Registered", node_id="d0", router_id="r", uplink_port=port))
    assert decode(frame(type="Registered", node_id="d0", uplink_port=65535)).uplink_port == 65535


def test_named_wrong_types():
    ok = fields_of(SAMPLES[0])
    for field, value in [("tp", "1"), ("tp", True), ("block_size", 16.0), ("kv_endpoints", {}),
                         ("node_id", None), ("pid", None)]:
        with pytest.raises(ControlError):
            decode(frame(type="Register", **{**ok, field: value}))
    beat = fields_of(SAMPLES[5])
    for field, value in [("load", []), ("load", None), ("kv_bytes_sent", False)]:
        with pytest.raises(ControlError):
            decode(frame(type="Heartbeat", **{**beat, field: value}))
    with pytest.raises(ControlError):                     # bool is not a float either
        decode(frame(type="KVSent", rid="r", error=None, seconds=True))


def test_step_tokens_items_are_checked_tokens():
    step = fields_of(SAMPLES[SAMPLES.index(m.StepTokens([]))])
    item = fields_of(m.Tokens("r1", [5], 1, [], False, None, None, 0, "", 1.5, None))
    good = decode(frame(type="StepTokens", items=[{"type": "Tokens", **item}]))
    assert good == m.StepTokens([m.Tokens(**item)])
    for bad in ([{"type": "Abort", "rid": "r1"}],         # another message in the list
                [{"type": "Tokens", **item, "output_len": "1"}],
                [{"type": "Tokens", **{k: v for k, v in item.items() if k != "rid"}}],
                {"type": "Tokens", **item}):              # not a list
        with pytest.raises(ControlError, match=r"at `\$\.items"):
            decode(frame(type="StepTokens", **{**step, "items": bad}))


FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCALARS = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
           | st.text(max_size=8) | st.binary(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
ALL_FIELDS = sorted({f.name for cls in MESSAGES.values() for f in msgspec.structs.fields(cls)})


def decode_or_refuse(data: bytes):
    """Decode ``data``: a message, or None when refused with ControlError."""
    try:
        msg = decode(data)
    except ControlError:
        return None
    assert type(msg).__name__ in MESSAGES
    assert encode(decode(encode(msg))) == encode(msg)   # bytes: NaN-proof
    return msg


@FAST
@given(st.binary(max_size=64))
def test_fuzz_arbitrary_bytes(data):
    decode_or_refuse(data)


@FAST
@given(st.sampled_from(sorted(MESSAGES)),
       st.dictionaries(st.sampled_from(ALL_FIELDS) | st.text(max_size=6), VALUES, max_size=14))
def test_fuzz_maps_with_valid_type(name, body):
    decode_or_refuse(frame(**{**body, "type": name}))


@FAST
@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_valid_fields_random_values(msg, data):
    """Right field names, random values: most mismatch, some decode."""
    body = {k: data.draw(VALUES | st.just(v)) for k, v in fields_of(msg).items()}
    got = decode_or_refuse(frame(type=type(msg).__name__, **body))
    if got is not None:
        assert type(got) is type(msg)


def test_strings_that_are_not_utf8_are_control_errors():
    """msgspec raises UnicodeDecodeError for them, not DecodeError."""
    good = encode(m.Abort("rid-x"))
    with pytest.raises(ControlError):
        decode(good.replace(b"rid-x", b"rid-\xb9"))
