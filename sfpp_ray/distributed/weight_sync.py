"""Versioned weight sync from the trainer to rollout workers.

The trainer publishes its generator after an update; rollout workers apply the published weights
in place and tag the rollouts they make afterwards with the version. Parameters travel in buckets
of at most `bucket_bytes`, so neither side ever holds a second full copy of the model: under
DeepSpeed ZeRO-3 each bucket's parameters are gathered, copied out and released before the next
(gathering the whole model at once is the classic ZeRO-3 out-of-memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import ray
import torch
from torch import nn

NamedParams = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class WeightsHandle:
    """What the controller passes from the trainer to rollout workers: small, no weights inside."""

    version: int
    bucket_refs: list[ray.ObjectRef]
    checksum: str  # sha256 over names, shapes, dtypes and bytes as sent; "" when not verified
    nbytes: int
    epoch: int = 0  # the broker's count of trainer restarts (rewinds) when it was published


class WeightSync(ABC):
    """Trainer side `publish`, worker side `apply`; one implementation per transport.

    `publish` must be called on every trainer rank (ZeRO-3 gathers are collectives); it returns
    the handle on rank 0 and None elsewhere. The controller hands the handle to every rollout
    worker, which calls `apply(model, handle)` and gets the version back.

    An NCCL implementation keeps this interface: at setup, trainer rank 0 and all rollout workers
    join one process group; `publish` broadcasts each gathered bucket as a single flat tensor and
    returns a handle that carries only the version and the bucket layout (names, shapes, dtypes);
    `apply` receives the same bucket sequence into a reused flat buffer and copies it into the
    parameters. Broadcasts are collectives, so the controller must start `publish` and every
    worker's `apply` together rather than one after the other.
    """

    @abstractmethod
    def publish(self, params: nn.Module | NamedParams, version: int) -> WeightsHandle | None: ...

    @abstractmethod
    def apply(self, model: nn.Module, handle: WeightsHandle) -> int: ...


class ObjectStoreWeightSync(WeightSync):
    """Buckets of numpy arrays in the Ray object store; works across nodes without extra setup.

    bfloat16 parameters travel as their raw bits in uint16 arrays (half the bytes of float32 and
    exact); no model has uint16 parameters, so a uint16 array always means bfloat16 bits. Other
    dtypes travel as themselves. The receiver casts to its own parameter dtype and device.

    The buckets are owned by trainer rank 0 and freed once every copy of the handle is dropped:
    the controller should drop the previous handle when all workers have applied the new one.
    """

    def __init__(self, bucket_bytes: int = 256 * 1024**2, verify: bool = True):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        self.bucket_bytes = bucket_bytes
        self.verify = verify
        self.published_version: int | None = None
        self.applied_version: int | None = None
        self.applied_epoch = 0

    def publish(self, params: nn.Module | NamedParams, version: int) -> WeightsHandle | None:
        if self.published_version is not None and version <= self.published_version:
            raise ValueError(f"weights version must increase: published {self.published_version}, got {version}")
        named = list(params.named_parameters() if isinstance(params, nn.Module) else params)
        zero3 = any(hasattr(p, "ds_id") for _, p in named)
        publisher = _rank() == 0
        if not publisher and not zero3:
            self.published_version = version
            return None
        digest = hashlib.sha256()
        refs, nbytes = [], 0
        for bucket in _buckets(named, self.bucket_bytes):
            with _gathered([p for _, p in bucket], zero3):
                if not publisher:
                    continue
                arrays = [(name, _to_numpy(p)) for name, p in bucket]
                if self.verify:
                    for name, arr in arrays:
                        _hash(digest, name, arr)
                refs.append(ray.put(arrays))  # serialised here, before the gathered params are released
                nbytes += sum(arr.nbytes for _, arr in arrays)
        self.published_version = version
        if not publisher:
            return None
        return WeightsHandle(version, refs, digest.hexdigest() if self.verify else "", nbytes)

    def apply(self, model: nn.Module, handle: WeightsHandle) -> int:
        """Copy the published weights into `model`'s parameters in place; returns the version. An older version
        is refused unless a restarted trainer published it (a later epoch)."""
        if (self.applied_version is not None and handle.version < self.applied_version
                and handle.epoch <= self.applied_epoch):
            raise ValueError(f"weights version {handle.version} is older than the applied {self.applied_version}")
        targets = dict(model.named_parameters())
        missing = set(targets)
        digest = hashlib.sha256()
        with torch.no_grad():
            for ref in handle.bucket_refs:
                bucket = ray.get(ref)
                for name, arr in bucket:
                    if name not in targets:
                        raise KeyError(f"published parameter {name!r} is not in the receiving model")
                    param = targets[name]
                    if tuple(param.shape) != arr.shape:
                        raise ValueError(f"parameter {name!r}: published shape {arr.shape}, "
                                         f"model has {tuple(param.shape)}")
                    param.copy_(_to_tensor(arr))
                    missing.discard(name)
                    if handle.checksum:
                        _hash(digest, name, arr)
        if missing:
            raise KeyError(f"weights version {handle.version} lacks parameters {sorted(missing)[:5]} "
                           f"({len(missing)} in all)")
        if handle.checksum and digest.hexdigest() != handle.checksum:
            raise RuntimeError(f"weights version {handle.version} failed its checksum: the model now "
                               "holds corrupt weights; apply a good handle before generating")
        self.applied_version, self.applied_epoch = handle.version, handle.epoch
        return handle.version


def state_checksum(model: nn.Module) -> str:
    """The checksum `publish` would compute for `model` (unsharded): equal models, equal strings."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        _hash(digest, name, _to_numpy(p))
    return digest.hexdigest()


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _buckets(named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket, size = [], 0
    for name, p in named:
        n = getattr(p, "ds_numel", p.numel()) * p.element_size()  # ZeRO-3 params report 0 numel while partitioned
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, p))
        size += n
    if bucket:
        yield bucket


def _gathered(params: list[torch.Tensor], zero3: bool) -> contextlib.AbstractContextManager:
    """Full values of ZeRO-3 partitioned parameters for the duration of the block (read only)."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed  # only trainer processes running ZeRO-3 get here

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # object-store arrays are read-only; this tensor is only read
        warnings.simplefilter("ignore", UserWarning)
        if arr.dtype == np.uint16:
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)


def _hash(digest, name: str, arr: np.ndarray) -> None:
    digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
    digest.update(np.ascontiguousarray(arr).data)


@ray.remote(num_cpus=0)
class WeightBroker:
    """Holds the newest published handle so rollout workers pull weights when they are ready.

    Trainer rank 0 publishes; workers ask between rollouts, so a sync never interrupts a rollout
    and the trainer never waits for workers. Only the newest handle is kept: dropping the older
    one lets its buckets be freed. `history` records (version, checksum) of every publish.
    An asyncio actor, so a worker that must not roll out stale weights can wait for a version.
    A trainer restarted from a checkpoint publishes its (older) weights with `rewind`: a new epoch, which every
    worker applies whatever version it holds.
    """

    def __init__(self):
        self._handle: WeightsHandle | None = None
        self._history: list[tuple[int, str]] = []
        self._published = asyncio.Condition()
        self._closed = False
        self._epoch = 0

    async def publish(self, handle: list[WeightsHandle], rewind: bool = False) -> None:
        """`handle` is a one-element list so the handle's bucket references pass through unresolved."""
        (new,) = handle
        if self._handle is not None and new.version <= self._handle.version and not rewind:
            raise ValueError(f"published version {new.version} is not newer than {self._handle.version}")
        async with self._published:
            self._epoch += rewind
            new = dataclasses.replace(new, epoch=self._epoch)
            self._handle = new
            self._history.append((new.version, new.checksum))
            self._published.notify_all()

    async def latest(self, after_version: int, wait: bool = False, epoch: int = 0) -> WeightsHandle | None:
        """The newest handle if it is newer than `after_version` or of another epoch than `epoch`; else None, or
        with `wait` the first one published that is (None if the broker is closed meanwhile)."""
        def newer() -> bool:
            return self._handle is not None and (self._handle.version > after_version or self._handle.epoch != epoch)

        if wait:
            async with self._published:
                await self._published.wait_for(lambda: newer() or self._closed)
        return self._handle if newer() else None

    async def close(self) -> None:
        """Release every waiting worker: training is over, no further weights will come."""
        async with self._published:
            self._closed = True
            self._published.notify_all()

    async def history(self) -> list[tuple[int, str]]:
        return list(self._history)
