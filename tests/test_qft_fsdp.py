"""QftWeight's FSDP2 support in one process: sharding by rows, the all-gather extension, shards under IntLion.

The 2-rank runs are in tests/test_distributed.py; these check each piece against the unsharded weight.
"""

import pytest
import torch

from peqa_peft.core.stochastic import counter_key
from peqa_peft.integrations.distributed import fsdp
from peqa_peft.integrations.distributed.fsdp import new_zeros_shard, pad_index, post_all_gather, pre_all_gather
from peqa_peft.optim.integer_update import lion_update_, reselect_outliers_
from peqa_peft.tuners.qft import QftWeight


class _Mesh:
    def __init__(self, world: int) -> None:
        self.world = world

    def size(self) -> int:
        return self.world


def _weight(rows: int = 12, cols: int = 10) -> QftWeight:
    torch.manual_seed(0)
    w = torch.randn(rows, cols)
    w[:2] *= 20  # most outliers crowd into the first shard, two are in row 9: shards hold different numbers of them
    w[9, :2] *= 100
    return QftWeight.from_float(w, 0.05, refresh_every=3)


def _gather(shards: list[QftWeight], out=None):
    """What FSDP2 does with the shards' all-gather inputs: concatenate each field over the ranks."""
    inputs = [pre_all_gather(s, _Mesh(len(shards))) for s in shards]
    outputs = tuple(torch.cat(fields) for fields in zip(*(i[0] for i in inputs)))
    return post_all_gather(outputs, inputs[0][1], torch.float32, out)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_gather_back_to_the_same_weight(world):
    w = _weight()
    shards = torch.chunk(w, world)  # FSDP2's sharding step, through QftWeight's split handler
    assert len(shards) == world and all(isinstance(s, QftWeight) for s in shards)
    assert len({s.outlier_idx.numel() for s in shards}) == 1  # equal all-gather inputs on every rank
    assert sum(s.num_outliers for s in shards) == w.num_outliers
    rows = w.shape[0] // world
    for r, shard in enumerate(shards):  # each shard is exactly its rows of the weight
        assert torch.equal(shard.dequantize(), w.dequantize()[r * rows : (r + 1) * rows])
    gathered, inner = _gather(shards)
    for name, tensor in w.state_tensors().items():
        assert torch.equal(gathered.state_tensors()[name], tensor), name
    assert gathered.int8_grad is False and gathered.refresh_every == 3  # FSDP2 reduce-scatters float gradients
    assert len(inner) == 5


def test_a_later_all_gather_writes_into_the_gathered_weight():
    w = _weight()
    shards = torch.chunk(w, 2)
    gathered, _ = _gather(shards)
    shards[1].outlier_val.add_(1.0)  # an optimizer step on rank 1
    assert _gather(shards, out=gathered) is None
    n = shards[1].num_outliers
    assert n and torch.equal(gathered.outlier_val[-n:], shards[1].outlier_val[:n])


def test_fully_shard_init_sequence_rebuilds_the_shard():
    # fully_shard: padded = param.new_zeros(shard size); padded.narrow(0, 0, rows).copy_(shard); padded.view(-1)
    w = _weight()
    shard = torch.chunk(w, 2)[1]
    padded = w.new_zeros(shard.shape)
    padded.narrow(0, 0, shard.shape[0]).copy_(shard)
    assert torch.equal(padded.view(-1).dequantize(), shard.dequantize())
    assert padded.num_outliers == shard.num_outliers


def test_uneven_or_column_sharding_is_refused():
    w = _weight(rows=10)
    with pytest.raises(NotImplementedError, match="divide evenly"):
        torch.chunk(w, 4)  # shards of 3, 3, 3 and 1 rows
    with pytest.raises(NotImplementedError, match="divide evenly"):
        w.new_empty(0)  # FSDP2's filler when there are fewer chunks than ranks (12 rows over 5)
    with pytest.raises(NotImplementedError, match="rows"):
        torch.chunk(w, 2, dim=1)
    with pytest.raises(NotImplementedError, match="no zero shard"):
        new_zeros_shard(w, [6, 3])


def test_a_shard_trains_like_its_rows_of_the_weight():
    w = _weight()
    top, bottom = torch.chunk(w, 2)
    direction = torch.randn(w.shape).sign()
    full = _weight()
    # The same update; the two draw different rounding noise, so codes agree up to one step.
    lion_update_(full, direction, 1e-2, 0.0, counter_key(0, 0, 1))
    lion_update_(bottom, direction[6:], 1e-2, 0.0, counter_key(0, 0, 1, shard=1))
    step = full.scale[6:]
    assert ((bottom.dequantize() - full.dequantize()[6:]).abs() <= step * 1.0001).all()
    # The outliers (float) take exactly the same update; the padding slots stay padding.
    n = bottom.num_outliers
    assert torch.equal(bottom.outlier_val[:n], full.outlier_val[-n:])
    assert (bottom.outlier_idx[n:] == pad_index(bottom.outlier_idx.dtype)).all()
    reselect_outliers_(top)
    assert top.num_outliers == torch.chunk(_weight(), 2)[0].num_outliers
    assert (top.outlier_idx[top.num_outliers :] == pad_index(top.outlier_idx.dtype)).all()


def test_loading_checks_the_padding():
    shard = torch.chunk(_weight(), 2)[1]
    assert shard.outlier_idx.numel() > shard.num_outliers  # this shard has padding slots
    fields = {k: v.clone() for k, v in shard.state_tensors().items()}
    fields["outlier_idx"][-1] = shard.numel()  # past the weight but not padding
    with pytest.raises(ValueError, match="not padding"):
        shard.load_state_tensors_(fields)


def test_float_gradients_under_fsdp2_are_announced(monkeypatch):
    monkeypatch.setitem(fsdp._WARNED, "int8_grad", False)
    with pytest.warns(RuntimeWarning, match="float weight gradients"):
        _gather(torch.chunk(_weight(), 2))


def test_flat_byte_views_are_refused_with_the_way_out():
    # DeepSpeed broadcasts parameters and ZeRO flattens them by viewing their bytes: impossible for integer codes.
    with pytest.raises(NotImplementedError, match="DDP or FSDP2"):
        _weight().view(torch.uint8)
