"""Chunked payloads, sans I/O: split, manifest and chunk codecs, bounded reassembly, hostile input."""

from __future__ import annotations

import hashlib
import math
import os
import tracemalloc

import msgpack
import pytest

from edge_agent import chunking as ch
from edge_agent import wire
from edge_agent.chunking import Chunk, ChunkError, Manifest, Reassembler


def _split(payload: bytes, size: int = 1000, **kw):
    return ch.split(payload, size, fed="f", round=3, of="update", **kw)


def _chunks(m: Manifest, pieces) -> list[Chunk]:
    return [Chunk(m.fed, m.round, m.sha256, i, bytes(p)) for i, p in enumerate(pieces)]


def _roundtrip(c: Chunk) -> Chunk:
    return ch.decode_chunk(ch.encode_chunk(c), fed="f")


def test_split_and_reassemble_in_any_order_gives_the_payload_back():
    payload = os.urandom(10_500)
    m, pieces = _split(payload)
    assert (m.count, m.size, m.chunk_size) == (11, 10_500, 1000)
    assert m.chunk_len(10) == 500 and m.sha256 == hashlib.sha256(payload).digest()
    assert ch.decode_manifest(ch.encode_manifest(m), fed="f") == m
    r = Reassembler()
    assert r.begin(m)
    chunks = _chunks(m, pieces)
    order = [5, 0, 10, 3, 1, 2, 4, 9, 8, 7]
    for i in order:
        assert r.add(_roundtrip(chunks[i])) is None
    assert r.missing() == [6]
    out = r.add(chunks[6])
    assert bytes(out) == payload
    assert r.manifest is None and r.buffered_bytes == 0 and r.missing() == []


def test_a_payload_of_one_exact_chunk_and_the_views_copy_nothing():
    payload = bytes(range(256)) * 4
    m, pieces = _split(payload, 1024)
    assert m.count == 1 and pieces[0].obj is not None and bytes(pieces[0]) == payload
    r = Reassembler()
    r.begin(m)
    assert bytes(r.add(_chunks(m, pieces)[0])) == payload


def test_duplicates_are_ignored_and_the_same_manifest_again_keeps_progress():
    m, pieces = _split(os.urandom(3000))
    c = _chunks(m, pieces)
    r = Reassembler()
    assert r.begin(m) is True
    r.add(c[0])
    assert r.add(c[0]) is None  # QoS 1 redelivery
    assert r.begin(m) is False  # manifest sent again after a reconnect: resume
    assert r.missing() == [1, 2]
    r.add(c[1])
    assert bytes(r.add(c[2]))[:10] == bytes(pieces[0])[:10]


def test_a_new_manifest_replaces_the_payload_in_progress():
    m1, p1 = _split(os.urandom(3000))
    m2, p2 = _split(os.urandom(2000))
    r = Reassembler()
    r.begin(m1)
    r.add(_chunks(m1, p1)[0])
    r.begin(m2)
    assert r.missing() == [0, 1] and r.manifest == m2
    with pytest.raises(ChunkError) as e:
        r.add(_chunks(m1, p1)[1])  # the old payload's chunk
    assert e.value.reason == "chunk_without_manifest"
    c2 = _chunks(m2, p2)
    r.add(c2[1])
    assert r.add(c2[0]) is not None


def test_same_payload_other_layout_is_a_new_manifest():
    payload = os.urandom(3000)
    m1, _ = _split(payload, 1000)
    m2, p2 = _split(payload, 1500)
    r = Reassembler()
    r.begin(m1)
    assert r.begin(m2) is True and r.missing() == [0, 1]
    c = _chunks(m2, p2)
    r.add(c[0])
    assert bytes(r.add(c[1])) == payload


@pytest.mark.parametrize("mutate, reason", [
    (lambda m, c: Chunk(c.fed, c.round, c.sha256, c.index, b"\x00" + bytes(c.data)[1:]), "chunk_hash_mismatch"),
    (lambda m, c: Chunk(c.fed, c.round, c.sha256, c.index, bytes(c.data)[:-1]), "chunk_hash_mismatch"),
    (lambda m, c: Chunk(c.fed, c.round, c.sha256, m.count, c.data), "chunk_out_of_range"),
    (lambda m, c: Chunk(c.fed, c.round, b"\x01" * 32, c.index, c.data), "chunk_without_manifest"),
])
def test_a_bad_chunk_is_rejected_with_its_reason_and_changes_nothing(mutate, reason):
    m, pieces = _split(os.urandom(2500))
    c = _chunks(m, pieces)
    r = Reassembler()
    r.begin(m)
    r.add(c[0])
    with pytest.raises(ChunkError) as e:
        r.add(mutate(m, c[1]))
    assert e.value.reason == reason and isinstance(e.value, wire.WireError)
    assert r.missing() == [1, 2] and r.received_bytes == 1000
    r.add(c[1])  # the genuine chunk still completes the payload
    assert r.add(c[2]) is not None


def test_a_chunk_before_any_manifest_is_rejected():
    m, pieces = _split(os.urandom(100))
    with pytest.raises(ChunkError, match="no manifest") as e:
        Reassembler().add(_chunks(m, pieces)[0])
    assert e.value.reason == "chunk_without_manifest"


def test_an_inconsistent_manifest_fails_the_total_hash_at_the_end():
    m, pieces = _split(os.urandom(2000))
    liar = Manifest(m.fed, m.round, m.of, m.size, m.chunk_size, hashlib.sha256(b"other").digest(), m.digests)
    r = Reassembler()
    r.begin(liar)
    c = [Chunk("f", 3, liar.sha256, i, bytes(p)) for i, p in enumerate(pieces)]
    r.add(c[0])
    with pytest.raises(ChunkError) as e:
        r.add(c[1])
    assert e.value.reason == "chunk_total_mismatch" and r.manifest is None and r.buffered_bytes == 0


def test_limits_too_large_and_too_many_chunks_keep_the_payload_in_progress():
    m, pieces = _split(os.urandom(5000))
    small, _ = _split(os.urandom(900))
    r = Reassembler(max_total=4999, max_chunks=4)
    r.begin(small)
    with pytest.raises(ChunkError) as e:
        r.begin(m)
    assert e.value.reason == "chunk_too_large"
    m2, _ = _split(os.urandom(4999))
    with pytest.raises(ChunkError) as e:
        r.begin(m2)  # 5 chunks > 4
    assert e.value.reason == "chunk_bad_manifest"
    assert r.manifest == small


def test_incomplete_at_the_deadline():
    m, pieces = _split(os.urandom(3000))
    r = Reassembler(timeout=10.0)
    r.begin(m, now=100.0)
    r.add(_chunks(m, pieces)[2])
    assert r.expire(109.9) is None and r.manifest == m
    err = r.expire(110.0)
    assert err.reason == "chunk_incomplete" and "2 of 3 chunks missing" in err.detail
    assert r.manifest is None and r.buffered_bytes == 0
    assert r.expire(200.0) is None


def _manifest_map(**over):
    m, _ = _split(os.urandom(2500))
    base = msgpack.unpackb(ch.encode_manifest(m))
    base.update(over)
    return msgpack.packb({k: v for k, v in base.items() if v is not None}, use_bin_type=True)


@pytest.mark.parametrize("over, reason", [
    ({"count": 4}, "chunk_bad_manifest"),
    ({"chunks": b"\x00" * 31}, "chunk_bad_manifest"),
    ({"sha256": b"\x00" * 31}, "chunk_bad_manifest"),
    ({"of": "task"}, "chunk_bad_manifest"),
    ({"size": 0}, "bad_field"),
    ({"size": -5}, "bad_field"),
    ({"chunk_size": True}, "bad_field"),
    ({"size": 2.5}, "bad_field"),
    ({"sha256": "hex"}, "bad_field"),
    ({"count": None}, "missing_field"),
    ({"fed": "../x"}, "bad_field"),
    ({"fed": "g"}, "wrong_federation"),
    ({"kind": "chunk"}, "wrong_kind"),
    ({"v": 99}, "bad_version"),
])
def test_hostile_manifests_are_refused_with_a_reason(over, reason):
    with pytest.raises(wire.WireError) as e:
        ch.decode_manifest(_manifest_map(**over), fed="f")
    assert e.value.reason == reason


@pytest.mark.parametrize("payload, reason", [
    (b"", "empty"),
    (b"\xc1", "not_msgpack"),
    (msgpack.packb([1, 2]), "not_a_map"),
    (b"\x00" * (ch.MAX_MANIFEST_BYTES + 1), "oversize"),
    (b"\x81\xa1v\xcf" + b"\xff" * 9, "not_msgpack"),  # trailing bytes after a uint64
])
def test_garbage_is_refused(payload, reason):
    with pytest.raises(wire.WireError) as e:
        ch.decode_manifest(payload, fed="f")
    assert e.value.reason == reason


def test_hostile_chunks_are_refused():
    m, pieces = _split(os.urandom(1500))
    good = msgpack.unpackb(ch.encode_chunk(_chunks(m, pieces)[0]))
    for over, reason in [({"index": -1}, "bad_field"), ({"index": "0"}, "bad_field"), ({"data": "text"}, "bad_field"),
                         ({"sha256": b"x"}, "chunk_bad_manifest"), ({"kind": "manifest"}, "wrong_kind")]:
        with pytest.raises(wire.WireError) as e:
            ch.decode_chunk(msgpack.packb({**good, **over}, use_bin_type=True), fed="f")
        assert e.value.reason == reason, over
    with pytest.raises(wire.WireError) as e:
        ch.decode_chunk(b"\x00" * (ch.MAX_CHUNK_MESSAGE_BYTES + 1))
    assert e.value.reason == "oversize"


def test_a_manifest_claiming_the_maximum_costs_no_memory_until_chunks_arrive():
    """The buffer is allocated zeroed (calloc): a hostile manifest of max_total bytes costs address space only."""
    size = 256 * 1024 * 1024
    m = Manifest("f", 0, "update", size, 1024 * 1024, b"\0" * 32, b"\0" * 32 * 256)
    def resident() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident()
    r = Reassembler(max_total=size)
    r.begin(m)
    assert r.buffered_bytes == size and r.received_bytes == 0
    # not touched, not resident (the process's own size varies with what else the suite imported)
    assert resident() - before < size // 16
    r.abandon()


def test_memory_held_is_one_payload_plus_one_chunk():
    """tracemalloc peak while 8 MiB arrive in 64 KiB chunks, one message at a time, as a receiver sees them."""
    size, csize = 8 * 1024 * 1024, 64 * 1024
    payload = os.urandom(size)
    m, pieces = _split(payload, csize)
    # encoded before measuring: the messages stand for what the broker holds, not the receiver
    messages = [ch.encode_manifest(m)] + [ch.encode_chunk(Chunk("f", 3, m.sha256, i, p)) for i, p in enumerate(pieces)]
    r = Reassembler()
    tracemalloc.start()
    try:
        r.begin(ch.decode_manifest(messages[0], fed="f"))
        out = None
        for i in range(m.count):
            out = r.add(ch.decode_chunk(messages[i + 1], fed="f"))
            messages[i + 1] = None  # handled: the receiver no longer holds it
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out is not None and bytes(out) == payload
    assert peak < size + 2 * csize, peak  # the buffer, one decoded chunk, small change


def test_sizes_and_limits():
    assert ch.effective_limit(0) == wire.MAX_PAYLOAD_BYTES
    assert ch.effective_limit(1 << 20) == 1 << 20
    assert ch.effective_limit(1 << 20, 1 << 19) == 1 << 19
    assert ch.effective_limit(0, 1 << 19) == 1 << 19
    assert ch.chunk_size_for(1 << 20) == (1 << 20) - ch.CHUNK_HEADROOM
    assert ch.chunk_size_for(1 << 30) == ch.MAX_CHUNK_BYTES
    with pytest.raises(ValueError, match="too small"):
        ch.chunk_size_for(8192)
    # the manifest at MAX_CHUNKS fits a 1 MiB limit, and so does a chunk message of chunk_size_for(limit)
    m = Manifest("f" * 64, 2 ** 40, "update", ch.MAX_CHUNKS * 64, 64, b"\0" * 32, b"\0" * 32 * ch.MAX_CHUNKS)
    assert len(ch.encode_manifest(m)) <= ch.MAX_MANIFEST_BYTES < (1 << 20) - ch.CHUNK_HEADROOM
    limit = 1 << 20
    big = Chunk("f" * 64, 2 ** 40, b"\0" * 32, ch.MAX_CHUNKS - 1, b"\0" * ch.chunk_size_for(limit))
    topic_and_header = 200
    assert len(ch.encode_chunk(big)) + topic_and_header <= limit
    with pytest.raises(ValueError, match="too small for this payload"):
        _split(b"x" * 100, 10, max_chunks=5)


def test_looks_like_manifest():
    m, _ = _split(os.urandom(3000))
    assert ch.looks_like_manifest(ch.encode_manifest(m))
    model = wire.encode(wire.MetricsMsg("f", 1, "v", 0))
    assert not ch.looks_like_manifest(model)
    assert not ch.looks_like_manifest(b"\xc1garbage")
    assert not ch.looks_like_manifest(b"")
    assert not ch.looks_like_manifest(b"\x80" * (ch.MAX_MANIFEST_BYTES + 1))


def test_outgoing_window_acks_and_resume():
    payload = os.urandom(10_000)
    m, pieces = _split(payload, 1000)
    out = ch.Outgoing(m, pieces, window=3)
    due = out.due()
    assert due == [-1, 0, 1]
    for mid, i in zip((11, 12, 13), due):
        out.sent(i, mid)
    assert out.due() == []
    assert out.published(11) and not out.published(99)
    assert out.due() == [2]
    out.sent(2, 14)
    # a disconnect: what is in flight stays the client's (paho resends it); nothing is sent twice by us
    assert out.due() == []
    for mid in (12, 13, 14):
        out.published(mid)
    assert out.acked == {-1, 0, 1, 2} and out.due() == [3, 4, 5]
    # receiving what the sender sends gives the payload back
    r = Reassembler()
    r.begin(ch.decode_manifest(out.message(-1), fed="f"))
    got = None
    for i in range(m.count):
        got = r.add(ch.decode_chunk(out.message(i), fed="f")) or got
    assert bytes(got) == payload
    assert not out.done
    out.acked |= set(range(m.count))
    assert out.done and out.due() == []


def test_payload_bound():
    assert ch.payload_bound(10_000_000) == 40_000_000 + 1024 * 1024
    assert math.isinf(Reassembler().timeout)


def test_a_manifest_of_2_to_the_63_bytes_decodes_and_the_reassembler_refuses_it():
    big = msgpack.packb({"v": wire.WIRE_VERSION, "kind": "manifest", "fed": "f", "round": 0, "of": "update",
                         "size": 2 ** 63, "chunk_size": 2 ** 62, "count": 2, "sha256": b"\0" * 32,
                         "chunks": b"\0" * 64})
    m = ch.decode_manifest(big, fed="f")
    with pytest.raises(ChunkError) as e:
        Reassembler().begin(m)
    assert e.value.reason == "chunk_too_large"
