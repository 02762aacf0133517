import numpy as np
import pytest
import ray
from ray._private.internal_api import get_memory_info_reply, get_state_from_address

from sfpp_ray.config import BufferConfig
from sfpp_ray.distributed.buffer import create_buffer, offer, sample_nbytes

SHAPE = (1, 4, 3, 16, 16)  # (B, C, F, H, W) latents


def make_sample(rng: np.random.Generator) -> dict:
    return {"latents": rng.standard_normal(SHAPE, dtype=np.float32),
            "prompt_ids": rng.integers(0, 1000, size=8, dtype=np.int64)}


SAMPLE_BYTES = sample_nbytes(make_sample(np.random.default_rng(0)))


def pinned_bytes() -> int:
    """Bytes the object store must keep because some reference to them is alive."""
    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return get_memory_info_reply(state).store_stats.object_store_bytes_primary_copy


def balanced(m: dict) -> bool:
    return m["puts"] == m["retired"] + sum(m[k] for k in m if k.startswith("dropped_")) + m["fill"]


@ray.remote(num_cpus=0)
def produce(buffer, count: int, seed: int) -> int:
    """A producer as fast as it can go: it only ever waits on backpressure. Returns samples accepted."""
    rng = np.random.default_rng(seed)
    accepted = 0
    for i in range(count):
        version = ray.get(buffer.policy_version.remote())
        accepted += offer(buffer, make_sample(rng), version, meta={"prompt": f"prompt {i}"})
    return accepted


def train_step(latents: np.ndarray) -> float:
    """Stands in for the trainer's work so the producer runs ahead of the consumer."""
    x = latents.reshape(-1, 16)
    for _ in range(1000):
        x = np.tanh(x @ np.eye(16, dtype=np.float32) * 1.01)
    return float(x.sum())


def test_fast_producer_stays_bounded_and_drops_stale(ray_cluster):
    cfg = BufferConfig(max_items=8, max_bytes=5 * SAMPLE_BYTES, max_staleness=2, max_reuse=1)
    buffer = create_buffer(cfg)
    producer = produce.remote(buffer, 200, seed=1)

    for step in range(20):
        (item,) = ray.get(buffer.get.remote(1))
        sample = ray.get(item.ref)
        assert sample["latents"].shape == SHAPE and item.meta["prompt"].startswith("prompt ")
        assert step - item.policy_version <= cfg.max_staleness
        train_step(sample["latents"])
        del sample, item
        m = ray.get(buffer.metrics.remote())
        assert m["bytes"] <= cfg.max_bytes and m["fill"] <= cfg.max_items and balanced(m)
        ray.get(buffer.set_policy_version.remote(step + 1))
        m = ray.get(buffer.metrics.remote())
        assert m["age_max"] <= cfg.max_staleness and m["bytes"] == m["fill"] * SAMPLE_BYTES
        # Alive references pin objects: the buffer's plus the producer's pending sample. A buffer
        # that kept dropped references would pin nearly every sample produced so far.
        assert pinned_bytes() <= 2 * cfg.max_bytes

    m = ray.get(buffer.metrics.remote())
    assert m["served"] == m["retired"] == 20 and m["dropped_stale"] > 0 and balanced(m)

    ray.get(buffer.close.remote())  # wakes the blocked producer; its remaining puts are refused
    accepted = ray.get(producer)
    m = ray.get(buffer.metrics.remote())
    assert accepted == m["puts"] < 200 and m["refused_closed"] == 200 - accepted
    assert m["fill"] == 0 and m["bytes"] == 0 and balanced(m)
    assert pinned_bytes() <= 2 * cfg.max_bytes


def test_backpressure_blocks_until_space_frees(ray_cluster):
    rng = np.random.default_rng(2)
    buffer = create_buffer(BufferConfig(max_items=2, max_bytes=1 << 30, max_staleness=4, max_reuse=1))
    assert offer(buffer, make_sample(rng), 0) and offer(buffer, make_sample(rng), 0)

    assert not offer(buffer, make_sample(rng), 0, timeout=0)  # full: refused at once
    assert not offer(buffer, make_sample(rng), 0, timeout=0.2)  # nothing frees space in time
    assert ray.get(buffer.metrics.remote())["refused_full"] == 2

    blocked = buffer.put.remote([ray.put(make_sample(rng))], 0, [SAMPLE_BYTES])
    assert not ray.wait([blocked], timeout=0.3)[0]  # still waiting for room
    assert len(ray.get(buffer.get.remote(1))) == 1
    assert ray.get(blocked) is True
    m = ray.get(buffer.metrics.remote())
    assert m["fill"] == 2 and m["puts"] == 3 and m["waiting_producers"] == 0


def test_stale_puts_reuse_and_sampling(ray_cluster):
    rng = np.random.default_rng(3)
    buffer = create_buffer(BufferConfig(max_items=6, max_bytes=1 << 30, max_staleness=1, max_reuse=2), seed=3)
    ray.get(buffer.set_policy_version.remote(5))
    assert not offer(buffer, make_sample(rng), 3)  # generated two versions ago: refused as stale
    for _ in range(4):
        assert offer(buffer, make_sample(rng), 5)

    drawn = ray.get(buffer.sample.remote(3))
    assert len({item.ref for item in drawn}) == 3 and all(item.served == 1 for item in drawn)
    served = [item for _ in range(3) for item in ray.get(buffer.get.remote(1))]
    assert [item.served for item in served] == [1, 2, 2]  # unserved samples come first
    m = ray.get(buffer.metrics.remote())
    assert m["retired"] == 2 and m["fill"] == 2 and m["refused_stale"] == 1 and balanced(m)

    assert ray.get(buffer.get.remote(3, timeout=0)) != []  # fewer than asked on timeout
    assert ray.get(buffer.set_policy_version.remote(7)) == ray.get(buffer.metrics.remote())["fill"]

    state = ray.get(buffer.state_dict.remote())
    restored = create_buffer(BufferConfig())
    ray.get(restored.load_state_dict.remote(state))
    assert ray.get(restored.state_dict.remote()) == state


def test_rejects_what_can_never_fit(ray_cluster):
    buffer = create_buffer(BufferConfig(max_items=4, max_bytes=SAMPLE_BYTES, max_staleness=1, max_reuse=1))
    with pytest.raises(ValueError, match="can never fit"):
        ray.get(buffer.put.remote([ray.put(0)], 0, [2 * SAMPLE_BYTES]))
    with pytest.raises(ValueError, match="policy version went back"):
        ray.get(buffer.set_policy_version.remote(-1))


def test_read_ahead_is_bounded_until_the_trainer_acknowledges_rows(ray_cluster):
    rng = np.random.default_rng()
    cap = int(rng.integers(2, 6))
    buffer = create_buffer(BufferConfig(max_items=cap, max_bytes=1 << 30, max_staleness=3, max_reuse=1))
    producer = produce.remote(buffer, 3 * cap, seed=int(rng.integers(1000)))
    drawn = [ray.get(buffer.get.remote(1, ahead=True)) for _ in range(cap)]
    assert all(len(d) == 1 for d in drawn)
    assert ray.get(buffer.get.remote(1, timeout=0.2, ahead=True)) == []  # samples wait, but the pipeline is full
    assert len(ray.get(buffer.get.remote(1, timeout=0.2))) == 1  # a row the trainer makes itself is not read-ahead
    ray.get(buffer.consumed.remote(2, 1))
    assert len(ray.get(buffer.get.remote(2, ahead=True))) == 2
    m = ray.get(buffer.metrics.remote())
    assert m["read_ahead"] == m["read_ahead_max"] == cap and m["served_ahead"] == cap + 2
    assert m["consumed"] == 2 and m["discarded_stale"] == 1
    ray.get(buffer.reset_read_ahead.remote())
    assert ray.get(buffer.metrics.remote())["read_ahead"] == 0
    ray.get(buffer.close.remote())
    ray.get(producer)


def test_rewind_and_a_dead_workers_samples_are_dropped(ray_cluster):
    rng = np.random.default_rng()
    buffer = create_buffer(BufferConfig(max_items=16, max_bytes=1 << 30, max_staleness=4, max_reuse=1))
    versions = rng.integers(1, 6, size=10)  # none stale at version 5 (max_staleness 4)
    workers = rng.integers(0, 2, size=10)
    for v, w in zip(versions, workers):
        assert offer(buffer, make_sample(rng), int(v), meta={"worker": int(w)})
    ray.get(buffer.set_policy_version.remote(5))
    with pytest.raises(ValueError, match="went back"):
        ray.get(buffer.set_policy_version.remote(2))
    # A trainer restarted from its checkpoint at version 2: samples of versions 3.. came from discarded weights.
    assert ray.get(buffer.set_policy_version.remote(2, rewind=True)) == int((versions > 2).sum())
    assert ray.get(buffer.purge_worker.remote(0)) == int(((versions <= 2) & (workers == 0)).sum())
    m = ray.get(buffer.metrics.remote())
    assert m["fill"] == int(((versions <= 2) & (workers == 1)).sum()) and m["policy_version"] == 2 and balanced(m)


def test_the_read_ahead_bound_must_hold_two_steps_of_rows():
    from pathlib import Path

    from sfpp_ray.config import ConfigError, load_config

    tiny = Path(__file__).parents[2] / "configs" / "tiny.yaml"
    ok = load_config(tiny, ["trainer.num_workers=2", "trainer.batch_size=2", "buffer.max_items=8"])
    assert ok.buffer.max_items == 8
    with pytest.raises(ConfigError, match=r"buffer.max_items.*= 8\), got 7"):
        load_config(tiny, ["trainer.num_workers=2", "trainer.batch_size=2", "buffer.max_items=7"])


def test_the_pipeline_takes_samples_that_outlast_their_wait(ray_cluster):
    """A row drawn ahead waits a version for each row drawn before it (one row a version here): it gets a sample
    that will still be within max_staleness then; a buffer full of older ones makes room for a newer one."""
    rng = np.random.default_rng()
    cap = int(rng.integers(4, 7))
    buffer = create_buffer(BufferConfig(max_items=cap, max_bytes=1 << 30, max_staleness=2, max_reuse=1),
                           rows_per_version=1)
    ray.get(buffer.set_policy_version.remote(5))
    for version in [3] * (cap - 2) + [4]:
        assert offer(buffer, make_sample(rng), version)
    assert ray.get(buffer.get.remote(1, ahead=True))[0].policy_version == 3  # trained next: 2 versions old will do
    assert ray.get(buffer.get.remote(1, ahead=True))[0].policy_version == 4  # a version later: skips the older
    assert ray.get(buffer.get.remote(1, timeout=0.2, ahead=True)) == []  # two later: only version 5 would do
    assert offer(buffer, make_sample(rng), 5)
    assert ray.get(buffer.get.remote(1, ahead=True))[0].policy_version == 5
    while ray.get(buffer.metrics.remote())["fill"] < cap:
        assert offer(buffer, make_sample(rng), 3)
    ray.get(buffer.consumed.remote(1))
    # Full of samples that would go stale: the oldest makes room for a rollout of the newest weights.
    assert ray.get(buffer.get.remote(1, timeout=0.2, ahead=True)) == []
    m = ray.get(buffer.metrics.remote())
    assert m["dropped_aged"] == 1 and m["fill"] == cap - 1 and balanced(m)
    assert offer(buffer, make_sample(rng), 5)
    assert ray.get(buffer.get.remote(1, ahead=True))[0].policy_version == 5
    assert ray.get(buffer.get.remote(1))[0].policy_version == 3  # the trainer's own draws stay oldest first


def test_samples_of_a_dead_worker_are_counted_lost_once(ray_cluster):
    """A sample reported lost by a consumer is not counted again when its worker's samples are purged, nor served
    again from the reuse queue."""
    rng = np.random.default_rng()
    buffer = create_buffer(BufferConfig(max_items=8, max_bytes=1 << 30, max_staleness=2, max_reuse=2))
    count = int(rng.integers(2, 6))
    for _ in range(count):
        assert offer(buffer, make_sample(rng), 0, meta={"worker": 0})
    (served,) = ray.get(buffer.get.remote(1))  # served once, queued again for its second use
    ray.get(buffer.lost.remote([served.ref]))  # its object turned out gone
    assert ray.get(buffer.purge_worker.remote(0)) == count - 1
    m = ray.get(buffer.metrics.remote())
    assert m["dropped_lost"] == count and m["lost_served"] == 0 and m["fill"] == 0 and balanced(m)
