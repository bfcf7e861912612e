"""KV-cache block transfer between worker processes over NIXL (UCX backend), pull mode.

The prefill worker (target) registers its host-memory block pool and publishes a
:class:`KVRegion`; the decode worker (initiator) reads blocks from it with
:meth:`NixlKVEndpoint.read_blocks`. NIXL delivers the read's notification message to the
target when the read completes, which is how the target learns it may free the blocks.

Progress model: agents are created without NIXL's progress thread (it polls with zero
timeout and spins a whole core per agent). Both sides therefore drive UCX themselves: the
initiator by polling the transfer state, the target by polling for notifications
(:meth:`NixlKVEndpoint.poll_notifications` or :meth:`NixlKVEndpoint.start_notification_loop`).
A target that stops polling stalls every read from it. Even over shared memory, where UCX
copies the data without the target's help, the initiator sees a read as done only once the
target has polled and accepted the read's notification, so the target's poll interval is a
floor on read latency.

``nixl`` is imported when the first endpoint is created, so importing this module (for
:class:`KVRegion`, say) costs nothing in processes that never transfer.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KVRegion", "KVTransferError", "NixlKVEndpoint", "TransferResult", "coalesce_runs"]

_log = logging.getLogger(__name__)

_MEM_TYPE = "DRAM"
_DRAM_DEV_ID = 0  # NIXL's device id for host memory
_BACKEND = "UCX"

# Initiator polling: start near-immediate (small KV reads finish within ~1 ms on loopback)
# and back off so a long read does not spin a core.
_XFER_POLL_MIN_S = 50e-6
_XFER_POLL_MAX_S = 1e-3

# Target notification loop: fast while blocks are waiting to be read (each read's
# completion needs the target's UCX progress), slow when idle so an idle worker is ~0% CPU.
_NOTIF_POLL_BUSY_S = 0.5e-3
_NOTIF_POLL_IDLE_S = 20e-3

_CLOSE_PROGRESS_ROUNDS = 5
_CLOSE_PROGRESS_SLEEP_S = 1e-3

# Defaults that keep UCX on loopback for single-machine runs; a deployment sets these in
# the environment to pick real transports and devices.
_UCX_ENV_DEFAULTS = {"UCX_TLS": "sm,self,tcp", "UCX_NET_DEVICES": "lo"}


class KVTransferError(RuntimeError):
    """A KV transfer failed or timed out, or the endpoint cannot transfer (closed, NIXL error).

    Transient from the caller's point of view: the peer may have exited or be overloaded.
    The underlying NIXL exception, if any, is chained as ``__cause__``.
    """


@dataclass(frozen=True)
class KVRegion:
    """What a peer needs to address an endpoint's block pool.

    Exchanged out of band (JSON via :meth:`to_dict` / :meth:`from_dict`); block ``i`` of the
    pool occupies ``[base_addr + i * block_nbytes, base_addr + (i + 1) * block_nbytes)`` in
    the owner's address space.
    """

    agent_name: str
    agent_metadata: bytes
    base_addr: int
    block_nbytes: int
    num_blocks: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; ``agent_metadata`` is base64 text."""
        return {
            "agent_name": self.agent_name,
            "agent_metadata": base64.b64encode(self.agent_metadata).decode("ascii"),
            "base_addr": self.base_addr,
            "block_nbytes": self.block_nbytes,
            "num_blocks": self.num_blocks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVRegion:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on a malformed dict."""
        try:
            region = cls(
                agent_name=str(data["agent_name"]),
                agent_metadata=base64.b64decode(data["agent_metadata"], validate=True),
                base_addr=int(data["base_addr"]),
                block_nbytes=int(data["block_nbytes"]),
                num_blocks=int(data["num_blocks"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed KVRegion dict: {data!r}") from exc
        if region.block_nbytes <= 0 or region.num_blocks <= 0 or region.base_addr <= 0:
            raise ValueError(f"KVRegion with non-positive field: {data!r}")
        return region


@dataclass(frozen=True)
class TransferResult:
    """One completed read. ``start_ns``/``end_ns`` are ``time.time_ns()`` on the initiator's
    clock at post and at observed completion; ``backend`` is e.g. ``"nixl/UCX"``."""

    bytes: int
    blocks: int
    start_ns: int
    end_ns: int
    backend: str

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def coalesce_runs(remote_ids: list[int], local_ids: list[int]) -> list[tuple[int, int, int]]:
    """Group pairs into runs consecutive on both sides: ``[(remote_start, local_start, n)]``."""
    runs: list[tuple[int, int, int]] = []
    for r, loc in zip(remote_ids, local_ids, strict=True):
        if runs:
            r0, l0, n = runs[-1]
            if r == r0 + n and loc == l0 + n:
                runs[-1] = (r0, l0, n + 1)
                continue
        runs.append((r, loc, 1))
    return runs


def _check_ids(ids: list[int], num_blocks: int, what: str) -> None:
    for i in ids:
        if not 0 <= i < num_blocks:
            raise ValueError(f"{what} block id {i} out of range [0, {num_blocks})")


class NixlKVEndpoint:
    """One per worker process: owns a NIXL agent and registers the process's whole KV pool.

    ``pool`` must be a contiguous CPU tensor whose first dimension is the block index; one
    block is ``pool[i]``, ``block_nbytes`` contiguous bytes. The endpoint keeps a reference
    to ``pool``; the caller must not resize or free it before :meth:`close`.

    Thread safety: every method may be called from any thread. NIXL calls are serialised
    by one internal lock that is never held while sleeping between polls, so concurrent
    :meth:`read_blocks` calls overlap on the wire.
    """

    def __init__(self, name: str, pool: torch.Tensor) -> None:
        if not name:
            raise ValueError(f"endpoint name must be non-empty, got {name!r}")
        if pool.device.type != "cpu":
            raise ValueError(f"pool must be a CPU tensor, got device {pool.device}")
        if not pool.is_contiguous():
            raise ValueError("pool must be contiguous")
        if pool.dim() < 1 or pool.shape[0] == 0 or pool[0].numel() == 0:
            raise ValueError(f"pool must have at least one non-empty block, shape {pool.shape}")

        for key, value in _UCX_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        try:
            from nixl._api import nixl_agent, nixl_agent_config

            agent = nixl_agent(
                name, nixl_agent_config(enable_prog_thread=False, backends=[_BACKEND])
            )
            if _BACKEND not in agent.backends:
                raise KVTransferError(f"NIXL {_BACKEND} backend unavailable for {name!r}")
            reg_descs = agent.register_memory(pool)
            metadata = agent.get_agent_metadata()
        except KVTransferError:
            raise
        except Exception as exc:
            raise KVTransferError(f"cannot create NIXL endpoint {name!r}: {exc}") from exc

        self._name = name
        self._pool = pool
        self._agent: Any = agent
        self._reg_descs: Any = reg_descs
        self._region = KVRegion(
            agent_name=name,
            agent_metadata=metadata,
            base_addr=pool.data_ptr(),
            block_nbytes=pool[0].numel() * pool.element_size(),
            num_blocks=pool.shape[0],
        )
        self._lock = threading.Lock()
        self._remote_metadata: dict[str, bytes] = {}  # agent name -> metadata it was added with
        self._closed = False
        self._loop_stop = threading.Event()
        self._loop_thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self._name

    def region(self) -> KVRegion:
        """This endpoint's pool, for peers to read from."""
        return self._region

    # -- initiator side ---------------------------------------------------------------

    def read_blocks(
        self,
        remote: KVRegion,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        notif: bytes,
        timeout_s: float = 30.0,
    ) -> TransferResult:
        """Copy ``remote`` blocks into this pool: ``remote_block_ids[i]`` → ``local_block_ids[i]``.

        Blocks until the read completes; ``notif`` is delivered to the target on completion.
        Raises ``ValueError`` for bad ids or a block-size mismatch (permanent), and
        :class:`KVTransferError` on NIXL failure, a vanished peer, or after ``timeout_s``
        (transient). The local blocks are undefined after a failure.
        """
        if len(remote_block_ids) != len(local_block_ids):
            raise ValueError(
                f"{len(remote_block_ids)} remote block ids but {len(local_block_ids)} local"
            )
        if not remote_block_ids:
            raise ValueError("no block ids to read")
        if remote.block_nbytes != self._region.block_nbytes:
            raise ValueError(
                f"remote block_nbytes {remote.block_nbytes} != local {self._region.block_nbytes}"
            )
        _check_ids(remote_block_ids, remote.num_blocks, "remote")
        _check_ids(local_block_ids, self._region.num_blocks, "local")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")

        nbytes = remote.block_nbytes
        runs = coalesce_runs(remote_block_ids, local_block_ids)
        local_descs = [
            (self._region.base_addr + loc * nbytes, n * nbytes, _DRAM_DEV_ID) for _, loc, n in runs
        ]
        remote_descs = [
            (remote.base_addr + r * nbytes, n * nbytes, _DRAM_DEV_ID) for r, _, n in runs
        ]

        deadline = time.monotonic() + timeout_s
        handle: Any = None
        try:
            with self._lock:
                self._ensure_open()
                self._ensure_remote(remote)
                handle = self._agent.initialize_xfer(
                    "READ",
                    self._agent.get_xfer_descs(local_descs, _MEM_TYPE),
                    self._agent.get_xfer_descs(remote_descs, _MEM_TYPE),
                    remote.agent_name,
                    notif,
                    [_BACKEND],
                )
                start_ns = time.time_ns()
                state = self._agent.transfer(handle)
            delay_s = _XFER_POLL_MIN_S
            while state == "PROC":
                if time.monotonic() >= deadline:
                    raise KVTransferError(
                        f"read of {len(remote_block_ids)} blocks from {remote.agent_name!r} "
                        f"timed out after {timeout_s} s"
                    )
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, _XFER_POLL_MAX_S)
                with self._lock:
                    self._ensure_open()
                    state = self._agent.check_xfer_state(handle)
            end_ns = time.time_ns()
            if state != "DONE":
                raise KVTransferError(
                    f"read from {remote.agent_name!r} failed: transfer state {state}"
                )
            return TransferResult(
                bytes=len(remote_block_ids) * nbytes,
                blocks=len(remote_block_ids),
                start_ns=start_ns,
                end_ns=end_ns,
                backend=f"nixl/{_BACKEND}",
            )
        except KVTransferError:
            raise
        except Exception as exc:
            # nixl's binding exceptions (nixlRemoteDisconnectError, nixlBackendError, ...)
            # derive from Exception only.
            raise KVTransferError(
                f"read from {remote.agent_name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if handle is not None:
                self._release(handle)

    def _ensure_open(self) -> None:
        if self._closed:
            raise KVTransferError(f"endpoint {self._name!r} is closed")

    def _ensure_remote(self, remote: KVRegion) -> None:
        """Load the peer's metadata once per agent name; reload it if the peer restarted
        (same name, new metadata). Caller holds the lock."""
        known = self._remote_metadata.get(remote.agent_name)
        if known == remote.agent_metadata:
            return
        if known is not None:
            self._agent.remove_remote_agent(remote.agent_name)
            del self._remote_metadata[remote.agent_name]
        loaded = self._agent.add_remote_agent(remote.agent_metadata)
        loaded_name = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if loaded_name != remote.agent_name:
            self._agent.remove_remote_agent(loaded_name)
            raise KVTransferError(
                f"KVRegion names agent {remote.agent_name!r} but its metadata is for "
                f"{loaded_name!r}"
            )
        self._remote_metadata[remote.agent_name] = remote.agent_metadata

    def _release(self, handle: Any) -> None:
        # Releasing an in-flight handle asks NIXL to cancel it; if that fails the handle's
        # finaliser parks it on the agent's leak list, so log and carry on.
        try:
            with self._lock:
                if not self._closed:
                    self._agent.release_xfer_handle(handle)
        except Exception:
            _log.warning("could not release NIXL transfer handle %r", handle, exc_info=True)

    # -- target side ------------------------------------------------------------------

    def poll_notifications(self) -> list[bytes]:
        """Drive this agent's progress once and return notification messages received
        since the last call (from any peer, in arrival order per peer). Non-blocking.

        Messages are consumed: with the notification loop running, they go to its
        callback instead."""
        with self._lock:
            self._ensure_open()
            try:
                by_agent = self._agent.get_new_notifs()
            except Exception as exc:
                raise KVTransferError(f"polling notifications failed: {exc}") from exc
        return [msg for msgs in by_agent.values() for msg in msgs]

    def start_notification_loop(
        self, on_notif: Callable[[bytes], None], busy: Callable[[], bool]
    ) -> None:
        """Start a daemon thread that polls notifications and calls ``on_notif(msg)`` for
        each, on that thread. It polls every ~0.5 ms while ``busy()`` is true and every
        ~20 ms otherwise. ``busy()`` must be true while any block is waiting to be read: a
        read carrying a notification completes on the initiator only after the target's
        next poll, so an idle-rate target adds up to ~20 ms to every read.
        Exceptions from the callbacks are logged and never stop the loop. Raises
        ``RuntimeError`` if a loop is already running; stopped by :meth:`close`."""
        with self._lock:
            self._ensure_open()
            if self._loop_thread is not None:
                raise RuntimeError(f"notification loop of {self._name!r} already running")
            self._loop_thread = threading.Thread(
                target=self._notification_loop,
                args=(on_notif, busy),
                name=f"nixl-notif-{self._name}",
                daemon=True,
            )
            self._loop_thread.start()

    def _notification_loop(
        self, on_notif: Callable[[bytes], None], busy: Callable[[], bool]
    ) -> None:
        while not self._loop_stop.is_set():
            try:
                messages = self.poll_notifications()
            except KVTransferError:
                if self._closed:
                    return
                _log.warning("notification poll failed on %r", self._name, exc_info=True)
                messages = []
            for msg in messages:
                try:
                    on_notif(msg)
                except Exception:
                    _log.exception("notification callback failed on %r", self._name)
            if messages:
                continue  # more may be queued right behind these
            try:
                is_busy = busy()
            except Exception:
                _log.exception("busy() callback failed on %r", self._name)
                is_busy = True
            self._loop_stop.wait(_NOTIF_POLL_BUSY_S if is_busy else _NOTIF_POLL_IDLE_S)

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Stop the notification loop and deregister the pool. Idempotent; reads in other
        threads fail with :class:`KVTransferError` afterwards."""
        self._loop_stop.set()
        thread = self._loop_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                for agent_name in list(self._remote_metadata):
                    self._agent.remove_remote_agent(agent_name)
                self._remote_metadata.clear()
                self._agent.deregister_memory(self._reg_descs)
                # UCX handles a failed peer connection (e.g. a read from a process that
                # exited) in a deferred callback that runs on the next worker progress;
                # destroying the worker with it still queued aborts the whole process
                # (ucs_arbiter assertion). Progress a few times before letting go.
                for _ in range(_CLOSE_PROGRESS_ROUNDS):
                    self._agent.get_new_notifs()
                    time.sleep(_CLOSE_PROGRESS_SLEEP_S)
            except Exception:
                _log.warning("error while closing NIXL endpoint %r", self._name, exc_info=True)
            # Drop the agent now so its teardown happens here, not at some later GC.
            self._agent = None
            self._reg_descs = None

    def __enter__(self) -> NixlKVEndpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
