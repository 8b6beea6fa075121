"""A node's routers (``disagg/node/router_links.py``): parsing ``--router``, DNS names
standing for every router replica, links opened and forgotten as the answers change,
and which router a request's messages go back to."""

from __future__ import annotations

import socket

import pytest
import zmq

from disagg.node import router_links
from disagg.node.router_links import RouterEntry, RouterLinks, parse_routers, resolve


def test_parse_routers_accepts_lists_and_names_and_refuses_the_rest():
    assert parse_routers("tcp://10.0.0.5:7100") == [RouterEntry("tcp://10.0.0.5:7100")]
    got = parse_routers(" tcp://10.0.0.5:7100 , tcp://routers.ns.svc:7100,ipc:///tmp/r ")
    assert got == [RouterEntry("tcp://10.0.0.5:7100"),
                   RouterEntry("tcp://routers.ns.svc:7100", "routers.ns.svc", 7100),
                   RouterEntry("ipc:///tmp/r")]
    assert parse_routers("tcp://[::1]:7100") == [RouterEntry("tcp://[::1]:7100")]
    for bad in ("", None, " , ", "10.0.0.5:7100", "http://r:1", "tcp://r", "tcp://r:x",
                "tcp://:7100", "tcp://r:7100/path"):
        with pytest.raises(ValueError):
            parse_routers(bad)


def test_a_name_resolves_to_every_address_ipv4_first(monkeypatch):
    answers = {"routers": [(socket.AF_INET6, "fd00::2"), (socket.AF_INET, "10.1.0.9"),
                           (socket.AF_INET, "10.1.0.7"), (socket.AF_INET, "10.1.0.7")],
               "v6only": [(socket.AF_INET6, "fd00::2")]}

    def getaddrinfo(host, port, *a, **k):
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return [(fam, socket.SOCK_STREAM, 6, "", (ip, port)) for fam, ip in answers[host]]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    (entry,) = parse_routers("tcp://routers:7100")
    assert resolve(entry) == ["tcp://10.1.0.7:7100", "tcp://10.1.0.9:7100"]
    assert resolve(parse_routers("tcp://v6only:7")[0]) == ["tcp://[fd00::2]:7"]
    assert resolve(parse_routers("tcp://10.0.0.1:7")[0]) == ["tcp://10.0.0.1:7"]
    with pytest.raises(OSError):
        resolve(parse_routers("tcp://nowhere:7")[0])


def test_links_follow_the_answers_and_forget_an_address_only_after_a_while(monkeypatch):
    answers = {"routers": ["10.1.0.7"]}
    clock = [1000.0]

    def getaddrinfo(host, port, *a, **k):
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(router_links.time, "monotonic", lambda: clock[0])
    ctx = zmq.Context()
    links = RouterLinks(ctx, "decode-0", "tcp://routers:7100,tcp://127.0.0.1:7101",
                        resolve_s=3600)              # lookups below are driven by hand
    try:
        opened, removed = links.sync()
        assert sorted(link.address for link in opened) == ["tcp://10.1.0.7:7100",
                                                            "tcp://127.0.0.1:7101"]
        assert removed == [] and links.sync() == ([], [])      # nothing new: no work
        answers["routers"] = ["10.1.0.7", "10.1.0.8"]             # a replica scaled up
        links._lookup(clock[0])
        opened, removed = links.sync()
        assert [link.address for link in opened] == ["tcp://10.1.0.8:7100"] and not removed
        del answers["routers"]                                   # DNS hiccup: keep all
        links._lookup(clock[0])
        assert links.sync() == ([], [])
        answers["routers"] = ["10.1.0.8"]                        # 10.1.0.7 went away...
        clock[0] += router_links.FORGET_AFTER_S / 2
        links._lookup(clock[0])
        assert links.sync() == ([], [])                          # ...not long enough yet
        clock[0] += router_links.FORGET_AFTER_S / 2 + 1
        links._lookup(clock[0])
        opened, removed = links.sync()
        assert not opened and [link.address for link in removed] == ["tcp://10.1.0.7:7100"]
        removed[0].close()
        assert links.addresses() == ["tcp://10.1.0.8:7100", "tcp://127.0.0.1:7101"]
    finally:
        links.close()
        ctx.term()


def test_a_request_goes_back_to_the_router_whose_id_ends_it():
    ctx = zmq.Context()
    one = RouterLinks(ctx, "d", "tcp://127.0.0.1:7101")
    many = RouterLinks(ctx, "d", "tcp://127.0.0.1:7102,tcp://127.0.0.1:7103")
    try:
        (only,) = one.sync()[0]
        assert one.owner("anything") is only                     # one router: all its own
        assert one.owned_by(only, "") is None                    # ...and all aborted with it
        a, b = many.sync()[0]
        assert many.owner("r1-aaaaaaaa") is None                 # before Registered: nobody
        a.router_id, b.router_id = "aaaaaaaa" + "0" * 24, "bbbbbbbb" + "1" * 24
        assert many.owner("r1-aaaaaaaa") is a and many.owner("r7-bbbbbbbb") is b
        assert many.owner("r1-cccccccc") is None and many.owner("plain") is None
        mine = many.owned_by(a, a.router_id)
        assert mine("r1-aaaaaaaa") and not mine("r1-bbbbbbbb") and not mine("plain")
        assert not many.owned_by(a, "")("r1-")                   # never registered: nothing
        assert not many.any_registered()
        b.registered = True
        assert many.any_registered()
    finally:
        one.close()
        many.close()
        ctx.term()
