"""Reading compiled HLO: replica groups in XLA's three notations, loop trip counts (stated or only
in the loop condition), and collectives per step mapped to mesh axes on a real compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tpt_jax.train import _hlo


def test_replica_groups_in_every_notation():
    listed = "x = f32[4] all-reduce(y), replica_groups={{0,2},{1,3}}, to_apply=%add"
    assert _hlo.replica_groups(listed) == [[0, 2], [1, 3]]
    iota = "x = f32[4] all-gather(y), replica_groups=[2,4]<=[8], dimensions={0}"
    assert _hlo.replica_groups(iota) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    transposed = "x = f32[4] all-gather(y), replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}"
    assert _hlo.replica_groups(transposed) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    mesh = "x = f32[4] all-reduce(y), replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, use"
    assert _hlo.replica_groups(mesh) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    mesh_ids = (
        "x = f32[4] all-reduce(y), replica_groups=mesh['axis_0'=2,'axis_1'=4], "
        "device_ids=([4,2]T(1,0)) {'axis_0'}, use"
    )
    # device grid [[0,2,4,6],[1,3,5,7]]: groups run down its columns
    assert _hlo.replica_groups(mesh_ids) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    permute = "x = f32[4] collective-permute(y), source_target_pairs={{0,1},{1,0}}"
    assert _hlo.replica_groups(permute) == [[0, 1], [1, 0]]


_LOOP = """
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %v = f32[8] get-tuple-element(%p), index=1
  %ar = f32[8] all-reduce(%v), channel_id=1, replica_groups=[1,2]<=[2], to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
}

%cond (q: (s32[], f32[8])) -> pred[] {
  %limit = s32[] constant(12)
  %q = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %ag = f32[16] all-gather(%a), channel_id=2, replica_groups=[1,2]<=[2], dimensions={0}
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""


def test_trip_count_from_the_loop_condition():
    program = _hlo.parse(_LOOP)
    assert program.runs["body"] == 12 and program.runs["main"] == 1
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("fsdp",))
    by_kind = {c.kind: c for c in _hlo.collectives(program, mesh)}
    assert by_kind["all-reduce"].count == 12 and by_kind["all-reduce"].bytes == 12 * 32
    assert by_kind["all-gather"].count == 1 and by_kind["all-gather"].axes == ("fsdp",)


def test_collectives_of_a_compiled_scan_are_counted_per_layer():
    """Weights sharded over fsdp, used one layer at a time in a scan over 5 layers: every layer
    gathers its weight over fsdp, and nothing crosses the data axis but the loss."""
    devices = np.asarray(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    weights = NamedSharding(mesh, PartitionSpec(None, "fsdp", None))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))

    def loss(w, x):
        def layer(h, w_layer):
            h = jax.lax.with_sharding_constraint(jnp.tanh(h @ w_layer), rows)
            return h, None

        h, _ = jax.lax.scan(layer, x, w)
        return jnp.mean(h**2)

    step = jax.jit(jax.grad(loss), in_shardings=(weights, rows), out_shardings=weights)
    compiled = step.lower(
        jax.ShapeDtypeStruct((5, 64, 64), jnp.float32), jax.ShapeDtypeStruct((32, 64), jnp.float32)
    ).compile()
    found = _hlo.collectives(_hlo.parse(compiled.as_text()), mesh)
    over_fsdp = [c for c in found if c.axes == ("fsdp",)]
    assert over_fsdp, found
    assert sum(c.count for c in over_fsdp) >= 2 * 5  # forward and backward, every layer
    assert all(c.count % 5 == 0 for c in over_fsdp if c.count > 1)
    assert all(c.axes in {("fsdp",), ("data", "fsdp"), ("data",)} for c in found)
