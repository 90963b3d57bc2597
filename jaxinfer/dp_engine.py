"""Data parallelism: several engine replicas over the mesh's "data" axis, behind the Engine interface.

Design choice: data parallelism as independent replicas (as in vLLM), not one batch split over "data".
Each replica owns a ``tensor_parallel_size``-device slice of the mesh, its own KV cache and scheduler,
so replicas never synchronise and a request's pages never span replicas. Weights are loaded once onto
the whole ``(data, model)`` mesh (replicated over "data"); each replica's parameters are then assembled
from the shards already on its devices (no copy). A request goes to the replica with the least work;
``step()`` launches every replica's step before waiting for any, so their device work overlaps.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxinfer.config import EngineConfig
from jaxinfer.engine import Engine, EngineStats
from jaxinfer.loader import LoadedModel
from jaxinfer.models.causal_lm import CausalLM
from jaxinfer.outputs import RequestOutput
from jaxinfer.sharding import MESH_AXES, ShardingPlan


def replica_slice(loaded: LoadedModel, replica: int) -> LoadedModel:
    """The model of data-parallel ``replica``: its mesh row, and parameters that reuse the shards already
    resident on that row's devices."""
    devices = loaded.mesh.devices[replica : replica + 1]
    sub = Mesh(devices, MESH_AXES)
    wanted = set(devices.flat)

    def restrict(x: jax.Array) -> jax.Array:
        sharding = NamedSharding(sub, x.sharding.spec)
        by_device = {s.device: s.data for s in x.addressable_shards if s.device in wanted}
        order = sharding.addressable_devices_indices_map(x.shape)
        return jax.make_array_from_single_device_arrays(x.shape, sharding, [by_device[d] for d in order])

    plan = ShardingPlan(sub, loaded.plan.rules, loaded.plan.kv_head_replicas)
    model = CausalLM(loaded.model.config, loaded.model.dtype, plan)
    return LoadedModel(loaded.source, model, jax.tree.map(restrict, loaded.params), loaded.tokenizer, sub, plan)


class DataParallelEngine:
    """``data_parallel_size`` :class:`Engine` replicas with the Engine interface.

    Args:
      loaded: the model loaded onto the whole ``(data, model)`` mesh.
      config: :class:`EngineConfig` with ``data_parallel_size`` replicas.
      draft: the loaded draft model (``speculative_method="draft"``), on the same mesh.
      model_name: the name front ends report.
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig, *, draft: LoadedModel | None = None,
                 model_name: str | None = None):
        if loaded.mesh.shape["data"] != config.data_parallel_size:
            raise ValueError("the loaded model's mesh does not match data_parallel_size")
        single = dataclasses.replace(config, data_parallel_size=1)
        self.replicas = [Engine(replica_slice(loaded, r), single, model_name=model_name,
                                draft=None if draft is None else replica_slice(draft, r))
                         for r in range(config.data_parallel_size)]
        first = self.replicas[0]
        self.config = config
        self.tokenizer = first.tokenizer
        self.model_config = first.model_config
        self.model_name = first.model_name
        self.max_model_len = first.max_model_len
        self._where: dict[str, Engine] = {}

    def _load(self, eng: Engine) -> int:
        s = eng.scheduler
        return s.num_running + s.num_waiting

    def add_request(self, request_id: str, prompt, sampling_params=None, *, arrival_time=None,
                    num_speculative_tokens=None, client=None, speculative_method=None) -> None:
        """As :meth:`Engine.add_request`; the request goes to the least loaded replica."""
        if request_id in self._where:
            from jaxinfer.errors import InvalidRequestError

            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        eng = min(self.replicas, key=self._load)
        eng.add_request(request_id, prompt, sampling_params, arrival_time=arrival_time,
                        num_speculative_tokens=num_speculative_tokens, client=client,
                        speculative_method=speculative_method)
        self._where[request_id] = eng

    def abort_request(self, request_id: str) -> bool:
        eng = self._where.get(request_id)
        return eng is not None and eng.abort_request(request_id)

    def step(self, exclude=()) -> list[RequestOutput]:
        started = [e.start_step(exclude) for e in self.replicas]
        outputs = []
        for e, s in zip(self.replicas, started):
            outputs += e.finish_step(s)
        for out in outputs:
            if out.finished:
                self._where.pop(out.request_id, None)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.replicas)

    def warmup(self, token_counts=None) -> float:
        return sum(e.warmup(token_counts) for e in self.replicas)

    def flush_prefix_cache(self) -> int:
        return sum(e.flush_prefix_cache() for e in self.replicas)

    def new_request_id(self) -> str:
        while True:
            rid = self.replicas[0].new_request_id()
            if rid not in self._where:
                return rid

    def stats(self) -> EngineStats:
        parts = [e.stats() for e in self.replicas]
        total = {f.name: sum(getattr(p, f.name) for p in parts) for f in dataclasses.fields(EngineStats)}
        queries = total["prefix_cache_queries"]
        total["prefix_cache_hit_rate"] = total["prefix_cache_hits"] / queries if queries else 0.0
        total["num_steps"] = int(np.max([p.num_steps for p in parts]))
        return EngineStats(**total)

