"""The Faust patches (streams/runtime/faust_patches.py) replace private methods and read
private attributes of faust-streaming and aiokafka. A version bump must fail loudly here,
not quietly in production: ``apply`` refuses other versions, and this test snapshots each
replaced method's signature and each private attribute the patches read."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from streams.runtime import faust_patches

#: Signatures of the methods the patches replace, as the pinned versions define them.
SIGNATURES = {
    "aiokafka.consumer.group_coordinator:GroupCoordinator._do_heartbeat": "(self)",
    "aiokafka.consumer.group_coordinator:GroupCoordinator._on_join_complete": "(self, generation, member_id, protocol, member_assignment_bytes)",
    "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread._commit": "(self, offsets: Mapping[faust.types.tuples.TP, int]) -> bool",
    "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread.call_thread": "(self, fun: Callable[..., collections.abc.Awaitable], *args: Any, **kwargs: Any)"
    " -> Any",
    "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread.verify_event_path": "(self, now: float, tp: faust.types.tuples.TP) -> None",
    "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread.getmany": "(self, active_partitions: Optional[Set[faust.types.tuples.TP]], timeout: float)"
    " -> Mapping[faust.types.tuples.TP, List[Any]]",
    "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread._create_worker_consumer": "(self, transport: 'Transport') -> aiokafka.consumer.consumer.AIOKafkaConsumer",
    "faust.transport.drivers.aiokafka:Producer.flush": "(self) -> None",
    "faust.transport.consumer:Consumer.commit": "(self, topics: Optional[AbstractSet[Union[str, faust.types.tuples.TP]]] = None,"
    " start_new_transaction: bool = True) -> bool",
    "faust.transport.consumer:Consumer._new_offset": "(self, tp: faust.types.tuples.TP) -> Optional[int]",
    "faust.transport.consumer:Consumer.getmany": "(self, timeout: float) -> AsyncIterator[Tuple[faust.types.tuples.TP,"
    " faust.types.tuples.Message]]",
    "faust.transport.consumer:Consumer.seek": "(self, partition: faust.types.tuples.TP, offset: int) -> None",
    "faust.transport.consumer:Consumer.on_partitions_revoked": "(self, revoked: Set[faust.types.tuples.TP]) -> None",
    "faust.transport.consumer:ThreadDelegateConsumer.seek_to_committed": "(self) -> Mapping[faust.types.tuples.TP, int]",
    "aiokafka.consumer.fetcher:Fetcher._get_actions_per_node": "(self, assignment)",
    "aiokafka.consumer.fetcher:Fetcher.fetched_records": "(self, partitions, timeout=0, max_records=None)",
    "aiokafka.consumer.fetcher:Fetcher._proc_fetch_request": "(self, assignment, node_id, request)",
    "faust.transport.consumer:Consumer.verify_all_partitions_active": "(self) -> None",
    "faust.assignor.partition_assignor:PartitionAssignor.on_assignment": "(self, assignment: aiokafka.coordinator.protocol.ConsumerProtocolMemberMetadata) -> None",
}

#: Private attributes the patches and the watchdog read: (module:class, attribute). Each must
#: still be set by that class (``self.<attr>`` in its source) or defined on it.
PRIVATE_READS = [
    ("faust.transport.consumer:Consumer", a)
    for a in (
        "_committed_offset",
        "_acked",
        "_acked_index",
        "_gap",
        "_read_offset",
        "_paused_partitions",
        "_buffered_partitions",
        "_active_partitions",
        "_unacked_messages",
    )
] + [
    ("faust.transport.drivers.aiokafka:AIOKafkaConsumerThread", "_ensure_consumer"),
    ("faust.transport.drivers.aiokafka:AIOKafkaConsumerThread", "_verify_aiokafka_event_path"),
    ("aiokafka.consumer.consumer:AIOKafkaConsumer", "_coordinator"),
    ("aiokafka.consumer.consumer:AIOKafkaConsumer", "_subscription"),
    ("aiokafka.consumer.consumer:AIOKafkaConsumer", "_fetcher"),
    ("aiokafka.consumer.consumer:AIOKafkaConsumer", "_fetch_max_wait_ms"),
    ("aiokafka.consumer.consumer:AIOKafkaConsumer", "_fetch_min_bytes"),
    ("aiokafka.consumer.consumer:AIOKafkaConsumer", "_client"),
    ("aiokafka.consumer.group_coordinator:GroupCoordinator", "_rejoin_needed_fut"),
    ("aiokafka.consumer.fetcher:Fetcher", "_records"),
    ("aiokafka.consumer.fetcher:Fetcher", "_fetch_max_wait_ms"),
    ("aiokafka.consumer.fetcher:Fetcher", "_fetch_min_bytes"),
    ("aiokafka.consumer.fetcher:Fetcher", "_fetcher_timeout"),
    ("faust.assignor.partition_assignor:PartitionAssignor", "_decompress"),
    ("faust.assignor.partition_assignor:PartitionAssignor", "_assignment"),
    ("faust.assignor.partition_assignor:PartitionAssignor", "_table_manager"),
    ("faust.assignor.partition_assignor:PartitionAssignor", "_url"),
    ("aiokafka.consumer.fetcher:FetchResult", "_backoff"),
    ("aiokafka.consumer.fetcher:FetchError", "_backoff"),
    ("aiokafka.consumer.subscription_state:TopicPartitionState", "_position"),
]

_SNAPSHOT = """
import importlib, inspect, json, sys
out = {}
for key in json.loads(sys.argv[1]):
    mod, qual = key.split(":")
    obj = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    out[key] = str(inspect.signature(obj))
print(json.dumps(out))
"""


def test_the_replaced_methods_keep_their_signatures() -> None:
    # In a fresh interpreter: in this one another test may have applied the patches already.
    out = subprocess.run(
        [sys.executable, "-c", _SNAPSHOT, json.dumps(list(SIGNATURES))],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == SIGNATURES


@pytest.mark.parametrize(
    ("where", "attr"), PRIVATE_READS, ids=[f"{w.split(':')[1]}.{a}" for w, a in PRIVATE_READS]
)
def test_the_private_attributes_read_still_exist(where: str, attr: str) -> None:
    mod, name = where.split(":")
    cls = getattr(importlib.import_module(mod), name)
    sources = "".join(
        inspect.getsource(c)
        for c in cls.__mro__
        if c.__module__.split(".")[0] in ("faust", "aiokafka", "mode")
    )
    assert hasattr(cls, attr) or f"self.{attr} =" in sources or f"self.{attr}:" in sources, (
        f"{where} no longer has {attr}"
    )


def test_apply_refuses_other_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(faust_patches.WRITTEN_FOR, "aiokafka", "0.0.1")
    with pytest.raises(
        faust_patches.PatchVersionError,
        match=r"aiokafka 0\.14\.0 \(written "
        r"for 0\.0\.1\)",
    ):
        faust_patches.apply()


def test_the_pinned_versions_are_the_ones_written_for() -> None:
    faust_patches.check_versions()  # the installed (pinned) versions pass
    pins = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    for dist, want in faust_patches.WRITTEN_FOR.items():
        assert f'"{dist}=={want}"' in pins


def test_each_patch_says_when_it_can_go() -> None:
    doc = faust_patches.__doc__ or ""
    points = [n for n in range(1, 20) if f"\n{n}. **" in doc]
    assert points and set(points) == set(faust_patches.DELETE_WHEN)
