"""A vLLM KV-event publisher for kvroute's tests, speaking vLLM's wire format.

Why a Python peer: the ingester must interoperate with the real thing, libzmq
(via pyzmq) and msgspec, not with a Rust re-implementation of them. The event
classes below mirror `vllm/distributed/kv_events.py` (msgspec Structs with the
same `array_like` / `tag` / `omit_defaults` options), so the payload bytes are
vLLM's: `--check-fixtures DIR` re-encodes every batch of
`testdata/vllm/*.json` and compares it with vLLM's own bytes.

Wire (as vLLM's `ZmqEventPublisher`):
  PUB:    [topic, seq as 8-byte big-endian, msgpack EventBatch]
  replay: ROUTER; request [id, "", start_seq (8 bytes BE)];
          v0.10 replies [id, "", seq, payload] ... then [id, "", -1, ""];
          v0.33 replies [id, "", topic, seq, payload] ... then [id, "", "", -1, ""].

Usage: `vllm_publisher.py '<json script>'` (or `@path`, or the script on stdin).
Once its sockets are up it prints one line
  READY {"pub": "tcp://127.0.0.1:PORT", "replay": "tcp://127.0.0.1:PORT" | null}
then `SUBSCRIBED` (when `await_subscriber_ms` is set and a subscriber came) and
`DONE <next seq>` after the last step. It runs until killed, until its stdin
reaches EOF (when the script came from argv and stdin is a pipe: the parent's
lifeline), or `exit_after_ms` after DONE.

Script keys (all optional):
  topic              "kv@127.0.0.1:8000@m"
  encoding           "v0.33" (map events, vLLM >= 0.11) | "v0.10" (array events)
  pub                endpoint, default "tcp://127.0.0.1:0"
  pub_mode           "bind" (default; vLLM's `tcp://*:5557`) | "connect"
  await_subscriber_ms  wait up to this long for a SUB's subscription before
                     the steps (uses XPUB, same bytes on the wire as PUB;
                     avoids ZeroMQ's slow-joiner loss in tests). 0: plain PUB.
  replay             ROUTER endpoint to bind (omit: no replay socket)
  replay_shape       "v0.33" (default, with topic) | "v0.10"
  buffer             replay ring size (vLLM's buffer_steps), default 10000
  seq                first sequence number, default 0
  block_size         tokens per generated block, default 16
  data_parallel_rank int or null
  steps              list, run in order:
    {"publish": N, "interval_ms": 5, "topic": "..."}  N generated batches
    {"batch": [event, ...], "send": true}   one batch of explicit events
        (`"send": false`: buffered for replay but never sent, a gap), JSON like
        {"type": "BlockStored", "block_hashes": [..], "parent_block_hash": null,
         "token_ids": [..], "block_size": 16, "medium": null, "lora_name": null}
        {"type": "BlockRemoved", "block_hashes": [..]}  {"type": "AllBlocksCleared"}
        {"type": "<other>", "fields": ...}  an event type vLLM does not have
        (fields: a list for v0.10, a map for v0.33), to test that it is skipped
    {"payload_hex": "..."}    one batch with exactly this payload
    {"skip": N}               N batches buffered for replay but never sent (a gap)
    {"restart": true}         the engine restarted: seq back to 0, buffer emptied
    {"frames": ["hex", ...]}  one raw multipart message (malformed on purpose)
    {"topic": "..."}          publish what follows under this topic
    {"sleep_ms": N}
    {"wait": "NAME"}          print `WAITING NAME`, then pause (still serving
                              replay requests) until the parent writes the line
                              NAME to stdin: lets a test act between phases
                              while the sequence continues
  forever_interval_ms  after the steps keep publishing generated batches
  exit_after_ms        exit this long after DONE
"""

import base64
import json
import os
import stat
import sys
import time
from collections import deque
from typing import Any, Optional, Union

import msgspec
import zmq

END_SEQ = (-1).to_bytes(8, "big", signed=True)


# vLLM 0.10: the batch and every event are array-like; events are tagged by
# class name as their first element.
class EventBatch010(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: Optional[int] = None


class KVCacheEvent010(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored010(KVCacheEvent010, tag="BlockStored"):
    block_hashes: list[Union[int, bytes]]
    parent_block_hash: Optional[Union[int, bytes]]
    token_ids: list[int]
    block_size: int
    lora_id: Optional[int]


class BlockRemoved010(KVCacheEvent010, tag="BlockRemoved"):
    block_hashes: list[Union[int, bytes]]


class AllBlocksCleared010(KVCacheEvent010, tag="AllBlocksCleared"):
    pass


# vLLM >= 0.11 (0.33 here): the batch stays array-like, events become maps
# with a "type" tag; defaulted fields are omitted, required ones (even when
# None) are always written.
class EventBatch033(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: Optional[int] = None


class KVCacheEvent033(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored033(KVCacheEvent033, tag="BlockStored"):
    block_hashes: list[Union[int, bytes]]
    parent_block_hash: Optional[Union[int, bytes]]
    token_ids: list[int]
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]
    lora_name: Optional[str]
    extra_keys: Optional[list[Optional[list[Any]]]] = None


class BlockRemoved033(KVCacheEvent033, tag="BlockRemoved"):
    block_hashes: list[Union[int, bytes]]
    medium: Optional[str]


class AllBlocksCleared033(KVCacheEvent033, tag="AllBlocksCleared"):
    pass


def make_event(encoding: str, ev: dict) -> Any:
    kind = ev["type"]
    hashes = [bytes.fromhex(h) if isinstance(h, str) else h for h in ev.get("block_hashes", [])]
    parent = ev.get("parent_block_hash")
    if isinstance(parent, str):
        parent = bytes.fromhex(parent)
    if encoding == "v0.10":
        if kind == "BlockStored":
            return BlockStored010(hashes, parent, ev["token_ids"], ev["block_size"], ev.get("lora_id"))
        if kind == "BlockRemoved":
            return BlockRemoved010(hashes)
        if kind == "AllBlocksCleared":
            return AllBlocksCleared010()
        # A type this vLLM does not have (a newer one): tag first, then "fields".
        return [kind, *ev.get("fields", [])]
    if kind == "BlockStored":
        return BlockStored033(
            hashes, parent, ev["token_ids"], ev["block_size"], ev.get("lora_id"),
            ev.get("medium"), ev.get("lora_name"), ev.get("extra_keys"),
        )
    if kind == "BlockRemoved":
        return BlockRemoved033(hashes, ev.get("medium"))
    if kind == "AllBlocksCleared":
        return AllBlocksCleared033()
    # A type this vLLM does not have (a newer one): a map with its "type" tag.
    return {"type": kind, **ev.get("fields", {})}


def map16(event: Any) -> msgspec.Raw:
    """A map-encoded event with the header vLLM 0.33's bytes carry.

    In vLLM's reference bytes a struct that has omittable (defaulted) fields,
    here BlockStored with `extra_keys`, is written with a 3-byte map16 header
    (`de 00 NN`), since its field count is only known after encoding; the
    msgspec in this venv writes a 1-byte fixmap. Same value, different bytes:
    rewrite the header so the payload is byte-identical to vLLM's.
    """
    raw = msgspec.msgpack.encode(event)
    if isinstance(event, BlockStored033) and 0x80 <= raw[0] <= 0x8F:
        raw = bytes([0xDE, 0x00, raw[0] & 0x0F]) + raw[1:]
    return msgspec.Raw(raw)


def encode_batch(encoding: str, ts: float, events: list, dp_rank: Optional[int]) -> bytes:
    if encoding == "v0.10":
        return msgspec.msgpack.encode(
            EventBatch010(ts, [make_event(encoding, e) for e in events], dp_rank))
    return msgspec.msgpack.encode(
        EventBatch033(ts, [map16(make_event(encoding, e)) for e in events], dp_rank))


def generated_events(seq: int, block_size: int) -> list:
    """One stored block per batch, its tokens derived from seq (tests check them)."""
    tokens = list(range(seq * block_size, (seq + 1) * block_size))
    return [{"type": "BlockStored", "block_hashes": [seq + 1], "parent_block_hash": None,
             "token_ids": tokens, "block_size": block_size}]


def check_fixtures(directory: str) -> int:
    """Re-encodes every fixture batch; prints one line per mismatch."""
    bad = 0
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        data = json.load(open(os.path.join(directory, name)))
        encoding = "v0.10" if data["vllm"].startswith("0.10") else "v0.33"
        for p in data["event_payloads"]:
            ts, events, dp = p["decoded"]
            evs = []
            for e in events:
                if isinstance(e, list):  # array-like: [tag, fields...]
                    names = {"BlockStored": ["block_hashes", "parent_block_hash", "token_ids",
                                             "block_size", "lora_id"],
                             "BlockRemoved": ["block_hashes"]}.get(e[0], [])
                    e = dict(zip(names, e[1:]), type=e[0])
                else:
                    e = dict(e)
                    e["block_hashes"] = [base64.b64decode(h).hex() if isinstance(h, str) else h
                                         for h in e.get("block_hashes", [])]
                    if isinstance(e.get("parent_block_hash"), str):
                        e["parent_block_hash"] = base64.b64decode(e["parent_block_hash"]).hex()
                evs.append(e)
            got = encode_batch(encoding, ts, evs, dp).hex()
            ok = got == p["msgpack_hex"]
            bad += not ok
            print(f"{'ok' if ok else 'MISMATCH'} {name} {p['name']} dp={dp}")
    return bad


class Publisher:
    def __init__(self, script: dict, watch_stdin: bool):
        self.s = script
        self.encoding = script.get("encoding", "v0.33")
        self.topic = script.get("topic", "kv@127.0.0.1:8000@m").encode()
        self.seq = int(script.get("seq", 0))
        self.block_size = int(script.get("block_size", 16))
        self.dp = script.get("data_parallel_rank")
        self.buffer = deque(maxlen=int(script.get("buffer", 10_000)))
        self.replay_shape = script.get("replay_shape", "v0.33")
        ctx = zmq.Context.instance()
        self.await_ms = int(script.get("await_subscriber_ms", 0))
        self.pub = ctx.socket(zmq.XPUB if self.await_ms else zmq.PUB)
        self.pub.set_hwm(100_000)  # vLLM's default hwm
        self.pub.linger = 0
        endpoint = script.get("pub", "tcp://127.0.0.1:0")
        if script.get("pub_mode", "bind") == "bind":
            self.pub.bind(endpoint)
            pub_ep = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.pub.connect(endpoint)
            pub_ep = endpoint
        self.replay = None
        replay_ep = None
        if script.get("replay"):
            self.replay = ctx.socket(zmq.ROUTER)
            self.replay.linger = 0
            self.replay.bind(script["replay"])
            replay_ep = self.replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller = zmq.Poller()
        if self.replay is not None:
            self.poller.register(self.replay, zmq.POLLIN)
        if self.await_ms:
            self.poller.register(self.pub, zmq.POLLIN)
        self.stdin_fd = sys.stdin.fileno() if watch_stdin else None
        if self.stdin_fd is not None:
            self.poller.register(self.stdin_fd, zmq.POLLIN)
        self.subscribed = False
        self.stdin_buf = b""  # lines from the parent, consumed by "wait" steps
        print("READY " + json.dumps({"pub": pub_ep, "replay": replay_ep}), flush=True)

    def idle(self, ms: float) -> None:
        """Sleeps `ms`, serving replay requests and subscriptions meanwhile."""
        deadline = time.monotonic() + ms / 1000
        while True:
            left = deadline - time.monotonic()
            for sock, _ in self.poller.poll(max(0, int(left * 1000))):
                if sock is self.replay:
                    self.serve_replay()
                elif sock is self.pub:
                    msg = self.pub.recv()
                    if msg[:1] == b"\x01":
                        self.subscribed = True
                elif sock == self.stdin_fd:
                    data = os.read(self.stdin_fd, 4096)
                    if not data:
                        sys.exit(0)
                    self.stdin_buf += data
            if time.monotonic() >= deadline:
                return

    def wait_for_line(self, name: str) -> None:
        """Pauses until the parent writes the line `name` (see "wait")."""
        if self.stdin_fd is None:
            sys.exit(f"wait step {name!r} needs the script on argv and a piped stdin")
        print(f"WAITING {name}", flush=True)
        while True:
            lines = self.stdin_buf.split(b"\n")
            if name.encode() in lines[:-1]:
                i = lines.index(name.encode())
                self.stdin_buf = b"\n".join(lines[i + 1:])
                return
            self.idle(5)

    def serve_replay(self) -> None:
        frames = self.replay.recv_multipart()
        if len(frames) != 3:
            print(f"invalid replay request of {len(frames)} frames", file=sys.stderr, flush=True)
            return
        client, _, start = frames
        start_seq = int.from_bytes(start, "big")
        for seq, topic, payload in self.buffer:
            if seq >= start_seq:
                head = [client, b""] + ([topic] if self.replay_shape == "v0.33" else [])
                self.replay.send_multipart(head + [seq.to_bytes(8, "big"), payload])
        tail = [client, b""] + ([b""] if self.replay_shape == "v0.33" else [])
        self.replay.send_multipart(tail + [END_SEQ, b""])

    def emit(self, payload: bytes, send: bool = True) -> None:
        if send:
            self.pub.send_multipart([self.topic, self.seq.to_bytes(8, "big"), payload])
        self.buffer.append((self.seq, self.topic, payload))
        self.seq += 1

    def generated(self) -> bytes:
        return encode_batch(self.encoding, time.time(),
                            generated_events(self.seq, self.block_size), self.dp)

    def run(self) -> None:
        if self.await_ms:
            deadline = time.monotonic() + self.await_ms / 1000
            while not self.subscribed and time.monotonic() < deadline:
                self.idle(5)
            print("SUBSCRIBED" if self.subscribed else "NO_SUBSCRIBER", flush=True)
        for step in self.s.get("steps", []):
            if "topic" in step and "publish" not in step:
                self.topic = step["topic"].encode()
            if "publish" in step:
                saved = self.topic
                self.topic = step.get("topic", saved.decode()).encode()
                for _ in range(int(step["publish"])):
                    self.emit(self.generated())
                    if step.get("interval_ms"):
                        self.idle(step["interval_ms"])
                self.topic = saved  # a step's own topic applies to that step only
            elif "batch" in step:
                self.emit(encode_batch(self.encoding, time.time(), step["batch"], self.dp),
                          send=step.get("send", True))
            elif "payload_hex" in step:
                self.emit(bytes.fromhex(step["payload_hex"]))
            elif "skip" in step:
                for _ in range(int(step["skip"])):
                    self.emit(self.generated(), send=False)
            elif step.get("restart"):
                self.seq = 0
                self.buffer.clear()
            elif "frames" in step:
                self.pub.send_multipart([bytes.fromhex(f) for f in step["frames"]])
            elif "sleep_ms" in step:
                self.idle(step["sleep_ms"])
            elif "wait" in step:
                self.wait_for_line(step["wait"])
        print(f"DONE {self.seq}", flush=True)
        interval = self.s.get("forever_interval_ms")
        exit_after = self.s.get("exit_after_ms")
        end = None if exit_after is None else time.monotonic() + exit_after / 1000
        while end is None or time.monotonic() < end:
            if interval:
                self.emit(self.generated())
                self.idle(interval)
            else:
                self.idle(50)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--check-fixtures":
        sys.exit(1 if check_fixtures(sys.argv[2]) else 0)
    if len(sys.argv) > 1:
        arg = sys.argv[1]
        script = json.load(open(arg[1:])) if arg.startswith("@") else json.loads(arg)
        # A piped stdin is the parent's lifeline: EOF means the test process
        # is gone (even if it could not kill us), so exit.
        watch_stdin = stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode)
    else:
        script = json.load(sys.stdin)
        watch_stdin = False
    Publisher(script, watch_stdin).run()


if __name__ == "__main__":
    main()
