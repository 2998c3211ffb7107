"""The distributed optimizer's state in model space, written by every rank without an exchange.

megatron-core's ``fully_sharded_model_space`` format maps each rank's slice of the optimizer's
flat buffers onto the parameters it belongs to, so the checkpoint holds one tensor per parameter
and state (``optimizer.state.exp_avg.<parameter key>``) in the model's own global shapes, like a
plain optimizer's: it loads at any TP/PP/VPP/DP. It described a slice with ``flattened_range``,
which megatron-core 0.19 no longer accepts. A slice of a flattened parameter is the same elements
as at most ``2 × ndim - 1`` blocks of the parameter, each contiguous in memory; megatron-core
0.19 saves and loads such uneven shards (torch's distributed checkpoint plans them). This module
builds those blocks; ``megatron_fixes`` puts it in place of megatron-core's two
methods.
"""

import math
from dataclasses import replace

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories


def blocks(start: int, stop: int, shape: tuple) -> list[tuple[tuple, tuple]]:
    """Elements ``start:stop`` of a row-major tensor of ``shape`` as (offset, size) blocks, in
    memory order, each contiguous in memory."""
    if start >= stop:
        return []
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    first, last = -(-start // inner), stop // inner  # the whole rows are first..last-1

    def in_row(row: int, begin: int, end: int) -> list:
        return [((row, *offset), (1, *size)) for offset, size in blocks(begin, end, shape[1:])]

    if first > last:  # inside one row
        return in_row(last, start - last * inner, stop - last * inner)
    head = in_row(first - 1, start - (first - 1) * inner, inner) if start < first * inner else []
    whole = [((first, *(0,) * (len(shape) - 1)), (last - first, *shape[1:]))] if first < last else []
    tail = in_row(last, 0, stop - last * inner) if last * inner < stop else []
    return head + whole + tail


def _shards(base, key: str, flat: torch.Tensor, start: int, replica_id) -> list[ShardedTensor]:
    """``flat`` (this rank's elements ``start:start + len(flat)`` of one state of the parameter that
    ``base`` describes in the model's sharded state dict) as blocks of the global tensor(s)."""
    placeholder = torch.empty(base.data.shape, dtype=flat.dtype, device="meta")
    if isinstance(base, ShardedTensorFactory):  # e.g. SwiGLU's fc1: halves saved as separate tensors
        parts = list(nested_values(base.build_fn(key, placeholder, replica_id, None)))
    else:
        parts = [replace(base, key=key, data=placeholder, dtype=flat.dtype, replica_id=replica_id)]
    stop, shards = start + flat.numel(), []
    for part in parts:
        assert part.data.is_contiguous(), f"{part.key}: a factory's part is not a contiguous slice"
        first = part.data.storage_offset()  # where the part starts in the flattened parameter
        begin, end = max(start, first), min(stop, first + part.data.numel())
        position = begin - start
        prepended = (1,) * part.prepend_axis_num  # e.g. the layer axis of decoder.layers.*: held as size 1
        for offset, size in blocks(begin - first, end - first, part.local_shape):
            numel, shape = math.prod(size), prepended + size
            global_offset = tuple(at + within for at, within in zip(part.global_offset, (0,) * len(prepended) + offset))
            shards.append(
                ShardedTensor(
                    key=part.key,
                    data=flat[position : position + numel].view(shape),
                    dtype=flat.dtype,
                    local_shape=shape,
                    global_shape=part.global_shape,
                    global_offset=global_offset,
                    axis_fragmentations=None,
                    replica_id=part.replica_id,
                    allow_shape_mismatch=part.allow_shape_mismatch,
                )
            )
            position += numel
    return shards


def _param_ranges(optimizer):
    """(model parameter, its range in this rank's shard), in megatron-core's order."""
    for gbuf_range_maps in optimizer.gbuf_ranges:
        for gbuf_range_map_for_all_buckets in gbuf_range_maps.values():
            for gbuf_range_map in gbuf_range_map_for_all_buckets:
                for model_param, param_range_map in gbuf_range_map["param_map"].items():
                    yield model_param, param_range_map["param"]


def sharded_param_state(optimizer, model_sharded_state_dict, is_loading: bool = False, metadata=None) -> dict:
    """Stands in for ``DistributedOptimizer.sharded_param_state_fs_model_space``."""
    tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    described = {base.data: base for base in nested_values(tensors)}
    state = {}
    for index, (model_param, param_range) in enumerate(_param_ranges(optimizer)):
        base = described[model_param]
        replica_id = (*base.replica_id[:2], optimizer.distributed_optimizer_instance_id)  # every DP rank a main copy
        states = optimizer._get_main_param_and_optimizer_states(model_param)
        states["fp32_param"] = states.pop("param")
        states.pop("step", None)  # restored from the param groups
        state[index] = {
            name: _shards(base, f"optimizer.state.{name}.{base.key}", value.view(-1), param_range.start, replica_id)
            for name, value in states.items()
        }
    return state


def load_param_state(optimizer, state_dict: dict) -> None:
    """Stands in for ``DistributedOptimizer.load_parameter_state_from_fs_model_space``."""
    for index, (model_param, _) in enumerate(_param_ranges(optimizer)):
        loaded = {
            "param" if name == "fp32_param" else name: torch.cat([shard.reshape(-1) for shard in shards])
            for name, shards in state_dict[index].items()
        }
        optimizer._set_main_param_and_optimizer_states(model_param, loaded)
