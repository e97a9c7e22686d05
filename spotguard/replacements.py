"""How far the surge's hand-overs are (spotguard.handover): for each pod released from its
ReplicaSet, has that ReplicaSet every replica Ready again?

Read at most every READ_SECONDS, once per ReplicaSet, from the API server's watch cache: a surge
lasts up to an hour, and a pool's nodes surge together.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Callable, Iterable

import structlog

from spotguard import handover
from spotguard import kube as k

READ_SECONDS = 2.0
log = structlog.get_logger("spotguard.replacements")


class Replacements:
    def __init__(self, kube: k.Kube, *, on_error: Callable[[], None]) -> None:
        self.kube = kube
        self.on_error = on_error
        # Pod uid -> is the ReplicaSet it was released from whole again? Absent: not known.
        self.ready: dict[str, bool] = {}
        self._read_at = -math.inf

    async def refresh(self, pods: Iterable[k.Obj]) -> None:
        released = {pod["metadata"]["uid"]: (pod["metadata"]["namespace"], "/".join(found)) for pod in pods
                    if (found := handover.released_from(pod)) is not None and not pod["metadata"].get("deletionTimestamp")}
        if not released:
            self.ready = {}
            return
        if time.monotonic() - self._read_at < READ_SECONDS:
            return
        self._read_at = time.monotonic()
        whole: dict[tuple[str, str], bool] = {}
        for namespace, key in sorted(set(released.values())):
            try:
                whole[(namespace, key)] = await asyncio.to_thread(self.kube.replicas_ready, namespace, key)
            except Exception as error:  # noqa: BLE001 - not known: the surge waits, bounded by its time
                self.on_error()
                log.warning("replicaset not readable", replicaset=key, error=str(error)[:300])
        self.ready = {uid: whole[where] for uid, where in released.items() if where in whole}
