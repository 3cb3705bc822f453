"""SNRAdamW inside PyTorch's distributed stack: DDP, FSDP2, ZeRO, distributed checkpoints.

Two ranks on this CPU (gloo, a free port on 127.0.0.1, 120 s timeouts), compared with a
single-process run of the same model and data. The update is elementwise, so a sharded or
replicated run must equal the single-process run up to float32 rounding of the gradient
all-reduce; a resumed run must equal the uninterrupted one bit for bit.
"""

import datetime
import io
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import BACKENDS
from snr_triton import SNRAdamW, codebook, reference
from snr_triton.param_states import SIGNED, STATE_KEYS, local

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
STEPS = 6
HP = dict(lr=1e-2, alpha=0.5, weight_decay=0.01)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 8, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(STEPS)]


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def single_process(backend, steps=STEPS):
    model = make_model()
    opt = SNRAdamW(model.parameters(), backend=backend, **HP)
    for x, y in batches()[:steps]:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, opt


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, port, world=WORLD):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def _finish():
    """Leave together, then skip interpreter finalization: gloo's worker threads can still hold
    tensors then and abort the process (SIGABRT, 'terminate called without an active exception',
    seen here in ~1 of 10 runs; pytorch/pytorch#179291)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _shard(x, rank):
    return x.chunk(WORLD)[rank]


def _ddp(rank, port, backend, out):
    _init(rank, port)
    model = torch.nn.parallel.DistributedDataParallel(make_model(), gradient_as_bucket_view=True)
    opt = SNRAdamW(model.parameters(), backend=backend, **HP)
    for x, y in batches():
        opt.zero_grad()
        loss_fn(model, _shard(x, rank), _shard(y, rank)).backward()
        opt.step()
    if rank == 0:
        torch.save({k: v.detach() for k, v in model.module.state_dict().items()}, out)
    _finish()


def _fsdp2_model(make=None):
    """make_model() (or `make()`) with each Linear and the whole model fully_shard-ed over the ranks (FSDP2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = (make or make_model)()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _dcp_save(model, opt, ckpt):
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)


def _dcp_load(model, opt, ckpt):
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def _fsdp(rank, port, backend, out, ckpt, phase):
    """phase 'straight': STEPS steps, saving a checkpoint after half; 'resume': load it, finish."""
    _init(rank, port)
    model = _fsdp2_model()
    opt = SNRAdamW(model.parameters(), backend=backend, **HP)
    half = STEPS // 2
    start = 0
    if phase == "resume":
        _dcp_load(model, opt, ckpt)
        start = half
    local_shapes = [opt.state[p]["exp_avg"].to_local().shape == p.to_local().shape
                    for p in model.parameters() if p in opt.state]
    for k, (x, y) in enumerate(batches()[start:], start):
        if phase == "straight" and k == half:
            _dcp_save(model, opt, ckpt)
        opt.zero_grad()
        loss_fn(model, _shard(x, rank), _shard(y, rank)).backward()
        opt.step()
        if k == start:
            local_shapes += [opt.state[p]["exp_avg"].to_local().shape == p.to_local().shape
                             for p in model.parameters()]
    full = {k: v.full_tensor().detach() for k, v in model.state_dict().items()}
    steps = [opt.state[p]["step"].item() for p in model.parameters()]
    if rank == 0:
        torch.save({"params": full, "local_shapes": local_shapes, "steps": steps}, out)
    _finish()


def make_8bit_model():
    """Shards of 320 elements (a block of 256 and one of 64 on each rank), uneven ones (7 rows: 4
    on rank 0, 3 on rank 1: 2 blocks and 1), and shards smaller than a block."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 80), torch.nn.Tanh(), torch.nn.Linear(80, 7))


def full_batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 8, generator=gen), torch.randn(8, 7, generator=gen)) for _ in range(STEPS)]


def _coded(opt, params):
    """Each param's 8-bit states: local codes and scales, and the global shape the scales show."""
    out = []
    for p in params:
        st = opt.state[p]
        out.append({k: (v.to_local().clone(), tuple(v.shape)) if hasattr(v, "to_local") else v.clone()
                    for k, v in st.items() if k != "step"})
    return out


def _fsdp_8bit(rank, port, backend, out, ckpt, phase):
    """FSDP2 with 8-bit states, every rank on the whole batch (so the reduce-scattered grads are
    the single process's exactly); phase 'straight' saves a DCP checkpoint after half the steps,
    'resume' loads it and finishes."""
    _init(rank, port)
    model = _fsdp2_model(make_8bit_model)
    opt = SNRAdamW(model.parameters(), backend=backend, state_dtype=torch.uint8, **HP)
    half, start = STEPS // 2, 0
    if phase == "resume":
        _dcp_load(model, opt, ckpt)
        start = half
    for k, (x, y) in enumerate(full_batches()[start:], start):
        if phase == "straight" and k == half:
            _dcp_save(model, opt, ckpt)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    params = list(model.parameters())
    full = {k: v.full_tensor().detach() for k, v in model.state_dict().items()}
    torch.save({"params": full, "states": _coded(opt, params), "steps": [opt.state[p]["step"].item() for p in params]},
               f"{out}.{rank}")
    _finish()


def sharded_in_one_process(backend):
    """The truth for FSDP2 with 8-bit states: one process, each param's torch.chunk shards stepped
    as params of their own (a block never spans two shards), the whole param put back together for
    the next forward."""
    model = make_8bit_model()
    params = list(model.parameters())
    pieces = [[torch.nn.Parameter(c.clone()) for c in p.detach().chunk(WORLD)] for p in params]
    opt = SNRAdamW([q for ps in pieces for q in ps], backend=backend, state_dtype=torch.uint8, **HP)
    for x, y in full_batches():
        model.zero_grad()
        loss_fn(model, x, y).backward()
        for p, ps in zip(params, pieces):
            for q, g in zip(ps, p.grad.chunk(WORLD)):
                q.grad = g.clone()
        opt.step()
        with torch.no_grad():
            for p, ps in zip(params, pieces):
                p.copy_(torch.cat([q.detach() for q in ps]))
    return {k: v.detach() for k, v in model.state_dict().items()}, [_coded(opt, ps) for ps in pieces]


def _zero(rank, port, backend, out, phase, ckpt):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    _init(rank, port)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=SNRAdamW, backend=backend, **HP)
    half = STEPS // 2
    data = batches()
    if phase == "resume":
        saved = torch.load(ckpt)
        model.module.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
        data = data[half:]
    for k, (x, y) in enumerate(data):
        opt.zero_grad()
        loss_fn(model, _shard(x, rank), _shard(y, rank)).backward()
        opt.step()
        if phase == "straight" and k == half - 1:
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                torch.save({"model": model.module.state_dict(), "optim": opt.state_dict()}, ckpt)
            dist.barrier()
    if rank == 0:
        torch.save({k: v.detach() for k, v in model.module.state_dict().items()}, out)
    _finish()


def spawn(fn, *args, nprocs=WORLD):
    mp.spawn(fn, args=(_free_port(), *args), nprocs=nprocs, join=True)


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in b)


DIST_BACKENDS = [b for b in BACKENDS if b != "eager"] or ["eager"]


@pytest.mark.parametrize("backend", DIST_BACKENDS)
def test_ddp_with_gradient_bucket_views(backend, tmp_path):
    out = tmp_path / "ddp.pt"
    spawn(_ddp, backend, str(out))
    expected, _ = single_process(backend)
    assert max_diff(torch.load(out), expected) <= 1e-6


@pytest.mark.parametrize("backend", DIST_BACKENDS)
def test_fsdp2_matches_single_process_and_resumes_bit_for_bit(backend, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    spawn(_fsdp, backend, str(straight), ckpt, "straight")
    spawn(_fsdp, backend, str(resumed), ckpt, "resume")
    a, b = torch.load(straight), torch.load(resumed)
    expected, _ = single_process(backend)
    assert max_diff(a["params"], expected) <= 1e-6
    assert all(a["local_shapes"]) and all(b["local_shapes"])  # state lives on the local shard
    assert a["steps"] == b["steps"] == [float(STEPS)] * len(a["steps"])
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k


@pytest.mark.parametrize("backend", DIST_BACKENDS)
def test_fsdp2_with_8bit_states_equals_its_shards_stepped_in_one_process_and_resumes_bit_for_bit(backend, tmp_path):
    """Issue 22: codes sharded like the params, each rank's blocks over its own shard, the scales a
    DTensor of one row per rank (padded to the largest shard's blocks) that DCP saves and loads."""
    ckpt = str(tmp_path / "ckpt")
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    spawn(_fsdp_8bit, backend, str(straight), ckpt, "straight")
    spawn(_fsdp_8bit, backend, str(resumed), ckpt, "resume")
    expected, shards = sharded_in_one_process(backend)
    runs = {name: [torch.load(f"{path}.{r}") for r in range(WORLD)] for name, path in
            (("straight", straight), ("resumed", resumed))}
    for rank in range(WORLD):
        a, b = runs["straight"][rank], runs["resumed"][rank]
        assert a["steps"] == b["steps"] == [float(STEPS)] * len(a["steps"])
        assert max_diff(a["params"], expected) <= 1e-6  # FSDP2's grads: the single process's to a rounding
        for k in expected:
            assert torch.equal(b["params"][k], a["params"][k]), k
        for i, (got, again) in enumerate(zip(a["states"], b["states"])):
            want = shards[i][rank]
            largest = codebook.blocks(shards[i][0]["exp_avg_codes"].numel())  # rank 0's shard is the largest
            for key, (held, shape) in got.items():
                assert torch.equal(again[key][0], held), (i, key)  # resumed bit for bit
                if key.endswith("_codes"):  # a grad's rounding may move a value across a code midpoint
                    apart = (held.int() - want[key].int()).abs()
                    assert apart.max() <= 1 and (apart > 0).float().mean() <= 0.01, (i, key)
                else:  # one row per rank, as long as the largest shard's blocks; the rest zero
                    assert shape == (WORLD, largest) and held.shape == (1, largest), (i, key)
                    n = want[key].numel()
                    torch.testing.assert_close(held[0, :n], want[key], rtol=1e-5, atol=0)
                    assert not held[0, n:].any(), (i, key)
    moved = sum((runs["straight"][0]["params"][k] != make_8bit_model().state_dict()[k]).sum() for k in expected)
    assert moved > 0


MESH_2D = (2, 2)  # (dp, tp): 4 ranks
# name: (shape, placements per mesh dim: "S<d>" sharded along param dim d, "R" replicated). Uneven
# splits (7 rows: 4 + 3; 9 rows: 5 + 4; 601 columns: 151, 150, 150, 150) so shards hold different
# block counts; HSDP's (Replicate, Shard); one param dim sharded over both mesh dims (strided); a
# complex param whose shards need twice their element count in blocks (450 complex: 4 blocks, not 2).
PARAMS_2D = {"fsdp_tp": ((7, 300), ("S0", "S1")), "hsdp": ((9, 60), ("R", "S0")),
             "dim_twice": ((5, 601), ("S1", "S1")), "replicated": ((3, 90), ("R", "R")), "plain": ((6, 50), ("R", "R")),
             "complex": ((5, 300), ("S0", "S1")), "dp_only": ((6, 40), ("S0", "R")), "tp_only": ((4, 30), ("R", "S0"))}
PLAIN_2D = {"plain"}  # a plain tensor beside the DTensors (each rank holds all of it, like replicated)
COMPLEX_2D = {"complex"}  # complex64: states of its real view, (..., 2), twice the elements in blocks
# params on one mesh dim's submesh, Shard(0) on each (as FSDP + TP shards norm weights over dp only):
# the same placements tuple on two meshes, whose shards the norm sums over different ranks
SUBMESH_2D = {"dp_only": "dp", "tp_only": "tp"}
STEPS_2D, MAX_NORM_2D = 4, 5.0


def _data_2d():
    gen = torch.Generator().manual_seed(3)
    dtype = {n: torch.complex64 if n in COMPLEX_2D else torch.float32 for n in PARAMS_2D}
    init = {n: torch.randn(shape, generator=gen, dtype=dtype[n]) for n, (shape, _) in PARAMS_2D.items()}
    grads = [{n: torch.randn(shape, generator=gen, dtype=dtype[n]) for n, (shape, _) in PARAMS_2D.items()}
             for _ in range(STEPS_2D)]
    return init, grads


def _local_2d(full, placements, coords):
    """The shard DTensor puts on the rank at mesh coordinates `coords`: mesh dims applied in order,
    each a torch.chunk of the param dim it shards."""
    for size, where, i in zip(MESH_2D, placements, coords):
        if where != "R":
            full = full.chunk(size, int(where[1:]))[i]
    return full.contiguous()


def _shard_key(where, coords):
    """Which shard a rank holds: its coordinates on the sharded mesh dims (replicated ones share)."""
    return tuple(i if w != "R" else 0 for w, i in zip(where, coords))


def _mesh_2d_8bit(rank, port, backend, out, ckpt):
    """DTensor params on a 2x2 mesh with 8-bit states and clipping in the step: a straight run that
    saves a DCP checkpoint after half the steps, then a fresh model and optimizer that load it and
    finish (must end where the straight run ends, bit for bit)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    _init(rank, port, world=4)
    mesh_2d = init_device_mesh("cpu", MESH_2D, mesh_dim_names=("dp", "tp"))
    meshes = {n: mesh_2d[SUBMESH_2D[n]] if n in SUBMESH_2D else mesh_2d for n in PARAMS_2D}
    kinds = {n: [Replicate() if w == "R" else Shard(int(w[1:])) for w in where if n not in SUBMESH_2D or w != "R"]
             for n, (_, where) in PARAMS_2D.items()}
    init, grads = _data_2d()

    def run(start, load):
        holder = torch.nn.Module()
        for n in PARAMS_2D:
            t = init[n].clone()
            holder.register_parameter(n, torch.nn.Parameter(t if n in PLAIN_2D else distribute_tensor(t, meshes[n], kinds[n])))
        opt = SNRAdamW(holder.parameters(), backend=backend, state_dtype=torch.uint8, max_grad_norm=MAX_NORM_2D, **HP)
        if load:
            _dcp_load(holder, opt, ckpt)
        norms = []
        for k in range(start, STEPS_2D):
            if not load and k == STEPS_2D // 2:
                _dcp_save(holder, opt, ckpt)
            for n, p in holder.named_parameters():
                g = grads[k][n].clone()
                p.grad = g if n in PLAIN_2D else distribute_tensor(g, meshes[n], kinds[n])
            opt.step()
            norms.append(opt.last_grad_norm().item())
        return holder, opt, norms

    straight, opt, norms = run(0, load=False)
    resumed, opt2, _ = run(STEPS_2D // 2, load=True)
    result = {"coords": mesh_2d.get_coordinate(), "norms": norms, "params": {}, "states": {}, "resumed_equal": True}
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        st, st2 = opt.state[p], opt2.state[q]
        result["params"][n] = local(p).detach().clone()
        result["states"][n] = {k: (local(v).clone(), tuple(v.shape), [pl.dim if pl.is_shard() else None
                                                                       for pl in getattr(v, "placements", ())],
                                   tuple(v.stride()))
                               for k, v in st.items() if k != "step"}
        result["resumed_equal"] &= torch.equal(local(p), local(q)) and all(
            torch.equal(local(v), local(st2[k])) for k, v in st.items() if k != "step")
    torch.save(result, f"{out}.{rank}")
    _finish()


def test_8bit_states_on_a_2d_mesh_equal_each_ranks_shard_stepped_in_one_process(tmp_path):
    """Issue 22 on a 2-D mesh (HSDP, FSDP + TP, one dim sharded twice, replicated, params on each
    mesh dim's submesh, a complex param): each rank's blocks cover its own shard; codes are
    DTensors placed like the param; scales have one dim per mesh dim (its size where sharded, 1
    where replicated) and the largest shard's blocks; the norm of the clipping is over every
    element once; a DCP resume ends bit for bit."""
    backend = "cpu" if "cpu" in DIST_BACKENDS else DIST_BACKENDS[0]
    out, ckpt = tmp_path / "mesh2d.pt", str(tmp_path / "ckpt")
    spawn(_mesh_2d_8bit, backend, str(out), ckpt, nprocs=4)
    init, grads = _data_2d()
    # the truth: one process, the distinct shards of every param stepped as params of their own
    coords = [(i, j) for i in range(MESH_2D[0]) for j in range(MESH_2D[1])]
    distinct = {(n, _shard_key(where, c)): torch.nn.Parameter(_local_2d(init[n], where, c))
                for n, (_, where) in PARAMS_2D.items() for c in coords}
    opt = SNRAdamW(list(distinct.values()), backend=backend, state_dtype=torch.uint8, max_grad_norm=MAX_NORM_2D, **HP)
    norms = []
    for k in range(STEPS_2D):
        for (n, c), q in distinct.items():  # a shard key is the coordinates of a rank holding it
            q.grad = _local_2d(grads[k][n], PARAMS_2D[n][1], c)
        opt.step()
        norms.append(opt.last_grad_norm().item())
    full_norms = [torch.nn.utils.get_total_norm(list(g.values())).item() for g in grads]
    assert min(full_norms) > MAX_NORM_2D  # clipping is active
    assert norms == pytest.approx(full_norms, rel=1e-6)
    for rank in range(4):
        got = torch.load(f"{out}.{rank}")
        c = tuple(got["coords"])
        assert got["resumed_equal"]
        assert got["norms"] == pytest.approx(full_norms, rel=1e-5)
        for n, (shape, where) in PARAMS_2D.items():
            q = distinct[(n, _shard_key(where, c))]
            torch.testing.assert_close(got["params"][n], q.detach(), rtol=0, atol=1e-6)
            real = 2 if n in COMPLEX_2D else 1  # a complex element is two reals in the blocks
            largest = max(codebook.blocks(real * _local_2d(init[n], where, cc).numel()) for cc in coords)
            layout = tuple(1 if w == "R" else m for w, m in zip(where, MESH_2D))
            sharded_on = [None if w == "R" else int(w[1:]) for w in where]  # per mesh dim: the param dim
            scale_dims = [None if w == "R" else j for j, w in enumerate(where)]
            if n in SUBMESH_2D:  # a 1-D mesh: its one dim
                layout, sharded_on, scale_dims = (MESH_2D[("dp", "tp").index(SUBMESH_2D[n])],), [0], [0]
            for key, (held, global_shape, placements, stride) in got["states"][n].items():
                want = opt.state[q][key]
                if n in PLAIN_2D:  # a plain param's own states
                    assert held.shape == want.shape and not placements, (n, key)
                    if key.endswith("_scales"):
                        torch.testing.assert_close(held, want, rtol=1e-5, atol=0)
                        continue
                if key.endswith("_codes"):  # placed like the param; a clipping coefficient's rounding
                    whole = (*shape, 2) if n in COMPLEX_2D else shape  # may cross a midpoint
                    assert global_shape == whole and held.shape == want.shape, (n, key)
                    assert stride == torch.empty(whole, device="meta").stride(), (n, key)  # as the whole's
                    assert n in PLAIN_2D or placements == sharded_on, (n, key)
                    apart = (held.int() - want.int()).abs()
                    assert apart.max() <= 1 and (apart > 0).float().mean() <= 0.01, (n, key)
                else:
                    assert global_shape == (*layout, largest) and held.shape == (*(1,) * len(layout), largest), (n, key)
                    assert placements == scale_dims, (n, key)
                    torch.testing.assert_close(held.reshape(-1)[:want.numel()], want, rtol=1e-5, atol=0)
                    assert not held.reshape(-1)[want.numel():].any(), (n, key)
    assert any(codebook.blocks(q.numel()) < codebook.blocks(max(r.numel() for r in distinct.values()))
               for q in distinct.values())  # some shards are padded


def test_zero_redundancy_optimizer_trains_and_checkpoints(tmp_path):
    backend = DIST_BACKENDS[0]
    ckpt, straight, resumed = (str(tmp_path / n) for n in ("zero.pt", "straight.pt", "resumed.pt"))
    spawn(_zero, backend, straight, "straight", ckpt)
    spawn(_zero, backend, resumed, "resume", ckpt)
    expected, _ = single_process(backend)
    a, b = torch.load(straight), torch.load(resumed)
    assert max_diff(a, expected) <= 1e-6
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _dtensor_grads(rank, port, backend, placement, out):
    """A Shard(0) param on 2 ranks whose grad arrives Replicate() or Partial(): the old code stepped
    rank 1 with rows 0-1 instead of 2-3 and used a partial grad unreduced (exp_avg 0.05, not 0.1)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    _init(rank, port)
    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(0)
    full, grads = torch.randn(4, 3, generator=gen), [torch.randn(4, 3, generator=gen) for _ in range(3)]
    p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
    opt = SNRAdamW([p], backend=backend, gate="none", lr=HP["lr"], weight_decay=HP["weight_decay"])
    for g in grads:
        if placement == "replicate":
            p.grad = DTensor.from_local(g.clone(), mesh, [Replicate()], run_check=False)
        else:  # each rank holds half of the sum
            p.grad = DTensor.from_local(g / WORLD, mesh, [Partial()], run_check=False)
        opt.step()
    result = {"param": p.full_tensor(), "exp_avg": opt.state[p]["exp_avg"].full_tensor()}
    if rank == 0:
        torch.save(result, out)
    _finish()


@pytest.mark.parametrize("placement", ["replicate", "partial"])
def test_dtensor_grads_with_other_placements_are_redistributed(placement, tmp_path):
    out = tmp_path / "dtensor.pt"
    spawn(_dtensor_grads, DIST_BACKENDS[0], placement, str(out))
    gen = torch.Generator().manual_seed(0)
    full, grads = torch.randn(4, 3, generator=gen), [torch.randn(4, 3, generator=gen) for _ in range(3)]
    p = torch.nn.Parameter(full.clone())
    ref = torch.optim.AdamW([p], lr=HP["lr"], weight_decay=HP["weight_decay"])  # the truth, on the whole tensor
    for g in grads:
        p.grad = g.clone()
        ref.step()
    got = torch.load(out)
    torch.testing.assert_close(got["param"], p.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["exp_avg"], ref.state[p]["exp_avg"], rtol=1e-6, atol=1e-7)


def _dtensor_refusals(rank, port, backend, out):
    """Grads a step cannot use, beside a plain param q and a Shard(0) param p, each given to a
    fresh optimizer (the full check), to one that has stepped both (their slots in place) and to
    one whose group was reordered after (only their places changed): the error each raises, and
    whether the params and their states stayed as they were. A DTensor grad for q, once q had
    stepped, used to reach the kernels (a segfault on cpu and triton)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    _init(rank, port)
    mesh = init_device_mesh("cpu", (WORLD,))
    bad = {"plain_for_dtensor": lambda: (None, torch.ones(4, 3)),
           "other_mesh": lambda: (None, DTensor.from_local(torch.ones(4, 3), DeviceMesh("cpu", [[0, 1]]),
                                                           [Replicate(), Replicate()], run_check=False)),
           "wrong_shard": lambda: (None, DTensor.from_local(torch.ones(3, 3), mesh, [Shard(0)], run_check=False,
                                                            shape=torch.Size((4, 3)), stride=(3, 1))),
           "dtensor_for_plain": lambda: (distribute_tensor(torch.ones(2), mesh, [Replicate()]), None)}

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    result = {}
    for how in ("fresh", "stepped", "moved"):
        q = torch.nn.Parameter(torch.ones(2))
        p = torch.nn.Parameter(distribute_tensor(torch.arange(12.0).reshape(4, 3), mesh, [Shard(0)]))
        opt = SNRAdamW([q, p], backend=backend)
        if how != "fresh":
            q.grad, p.grad = torch.ones(2), distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
            opt.step()
        if how == "moved":
            opt.param_groups[0]["params"].reverse()
        for name, grads in bad.items():
            before = [(local(x).clone(), {k: local(v).clone() for k, v in opt.state.get(x, {}).items()})
                      for x in (q, p)]
            q.grad, p.grad = grads()
            try:
                opt.step()
                error = None
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            unchanged = all(torch.equal(local(x), value) and all(torch.equal(local(opt.state[x][k]), v)
                                                                  for k, v in states.items())
                            for x, (value, states) in zip((q, p), before))
            result[name, how] = error, unchanged
    if rank == 0:
        torch.save(result, out)
    _finish()


@pytest.mark.parametrize("backend", DIST_BACKENDS)
def test_dtensor_grads_a_step_cannot_use_are_refused_by_name_and_change_nothing(backend, tmp_path):
    out = tmp_path / "refusals.pt"
    spawn(_dtensor_refusals, backend, str(out))
    expected = {"plain_for_dtensor": ("p", "one is a DTensor, the other is not"),
                "other_mesh": ("p", "the grad lives on another device mesh"),
                "wrong_shard": ("p", "local shard (3, 3), the param's (2, 3)"),
                "dtensor_for_plain": ("q", "one is a DTensor, the other is not")}
    got = torch.load(out)
    for (name, how), (error, unchanged) in got.items():
        who, what = expected[name]
        index = {"p": 1, "q": 0}[who] if how != "moved" else {"p": 0, "q": 1}[who]
        assert error == f"RuntimeError: grad does not match its param (param {index} of param group 0): {what}", \
            (name, how)
        assert unchanged, (name, how)
    assert len(got) == 12


def _fsdp_clip(rank, port, backend, max_norm, out):
    """FSDP2 with the clipping in the step: the norm must be over both ranks' shards."""
    _init(rank, port)
    model = _fsdp2_model()
    opt = SNRAdamW(model.parameters(), backend=backend, max_grad_norm=max_norm, **HP)
    norms = []
    for x, y in batches():
        opt.zero_grad()
        loss_fn(model, _shard(x, rank), _shard(y, rank)).backward()
        opt.step()
        norms.append(opt.last_grad_norm().item())
    full = {k: v.full_tensor().detach() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save({"params": full, "norms": norms}, out)
    _finish()


@pytest.mark.parametrize("backend", DIST_BACKENDS)
def test_fsdp2_clipping_in_the_step_equals_clip_grad_norm_in_one_process(backend, tmp_path):
    """Issue 20: max_grad_norm under FSDP2 (each rank holds half of every param) against one
    process that clips with torch.nn.utils.clip_grad_norm_ and then steps a plain SNRAdamW."""
    max_norm = 0.05  # below every step's norm: clipping is active
    out = tmp_path / "fsdp_clip.pt"
    spawn(_fsdp_clip, backend, max_norm, str(out))
    result = torch.load(out)
    model = make_model()
    opt = SNRAdamW(model.parameters(), backend=backend, **HP)
    norms = []
    for x, y in batches():
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
        opt.step()
    assert min(norms) > max_norm
    assert result["norms"] == pytest.approx(norms, rel=1e-5)
    expected = {k: v.detach() for k, v in model.state_dict().items()}
    assert max_diff(result["params"], expected) <= 1e-6


def _zero_clip(rank, port, out):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    _init(rank, port)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    try:
        ZeroRedundancyOptimizer(model.parameters(), optimizer_class=SNRAdamW, max_grad_norm=1.0, **HP)
        message = None
    except ValueError as e:
        message = str(e)
    if rank == 0:
        torch.save({"message": message}, out)
    _finish()


def test_max_grad_norm_under_zero_redundancy_optimizer_is_refused(tmp_path):
    """ZeroRedundancyOptimizer hands each rank's SNRAdamW its shard of the params only, so the norm
    would be the shard's: refused with the alternative named."""
    out = tmp_path / "zero_clip.pt"
    spawn(_zero_clip, str(out))
    message = torch.load(out)["message"]
    assert message == ("max_grad_norm: ZeroRedundancyOptimizer gives each rank's SNRAdamW only its shard of the "
                       "params, so the norm would be the shard's; leave max_grad_norm=None and clip with "
                       "torch.nn.utils.clip_grad_norm_(model.parameters(), c) before opt.step()")


FSDP1_REFUSAL = ("max_grad_norm: these params are FullyShardedDataParallel's (FSDP1), whose grads on each rank are "
                 "that rank's shard, so the norm would be the shard's; leave max_grad_norm=None and clip with FSDP's "
                 "model.clip_grad_norm_(c) before opt.step(), or shard with FSDP2 "
                 "(torch.distributed.fsdp.fully_shard), whose DTensor grads the step norms over the mesh")


def _fsdp1(rank, port, backend, use_orig_params, out):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    _init(rank, port)
    result = {}
    wrap = FSDP(make_model(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    try:
        SNRAdamW(wrap.parameters(), backend=backend, max_grad_norm=1.0, **HP)
        result["refused"] = None
    except ValueError as e:
        result["refused"] = str(e)
    plain = torch.nn.Parameter(torch.ones(3))
    opt = SNRAdamW([plain], backend=backend, max_grad_norm=1.0, **HP)
    try:
        opt.add_param_group({"params": list(wrap.parameters())})
        result["refused_late"] = None
    except ValueError as e:
        result["refused_late"] = str(e)
    result["groups"] = len(opt.param_groups)
    if use_orig_params:  # an optimizer made before the wrapping holds the params FSDP1 then shards
        model = make_model()
        opt = SNRAdamW(model.parameters(), backend=backend, max_grad_norm=1.0, **HP)
        model = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
        x, y = batches()[0]
        loss_fn(model, _shard(x, rank), _shard(y, rank)).backward()
        before = [p.detach().clone() for p in model.parameters()]
        try:
            opt.step()
            result["refused_at_step"] = None
        except ValueError as e:
            result["refused_at_step"] = str(e)
        result["unchanged"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not opt.state
    for name in ("snr", "adamw"):  # FSDP's own clip_grad_norm_ before each step, as the refusal says
        model = FSDP(make_model(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
        opt = (SNRAdamW(model.parameters(), backend=backend, gate="none", **HP) if name == "snr"
               else torch.optim.AdamW(model.parameters(), lr=HP["lr"], weight_decay=HP["weight_decay"], foreach=False))
        for x, y in batches():
            opt.zero_grad()
            loss_fn(model, _shard(x, rank), _shard(y, rank)).backward()
            model.clip_grad_norm_(0.05)
            opt.step()
        with FSDP.summon_full_params(model):
            result[name] = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    # 8-bit states: each rank's opt.state_dict() resumes bit for bit (FSDP.optim_state_dict cannot
    # gather codes and scales)
    runs = []
    for resume in (False, True):
        model = FSDP(make_model(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
        init = [p.detach().clone() for p in model.parameters()]
        opt = SNRAdamW(model.parameters(), backend=backend, state_dtype=torch.uint8, **HP)
        for k, (x, y) in enumerate(batches()):
            if resume and k == STEPS // 2:  # a checkpoint of each rank's shard, a fresh process's objects
                buffer = io.BytesIO()
                torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in model.parameters()]}, buffer)
                saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
                model = FSDP(make_model(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
                with torch.no_grad():
                    for p, q in zip(model.parameters(), saved["params"]):
                        p.copy_(q)
                opt = SNRAdamW(model.parameters(), backend=backend, state_dtype=torch.uint8, **HP)
                opt.load_state_dict(saved["opt"])
            opt.zero_grad()
            loss_fn(model, _shard(x, rank), _shard(y, rank)).backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    result["8bit_resumed_equal"] = all(torch.equal(a, b) for a, b in zip(*runs))
    result["8bit_moved"] = any(p.numel() and not torch.equal(p, q) for p, q in zip(runs[0], init))
    if rank == 0:
        torch.save(result, out)
    _finish()


@pytest.mark.parametrize("use_orig_params", [True, False], ids=["orig_params", "flat_params"])
def test_fsdp1_params_refuse_max_grad_norm_and_step_like_adamw_after_fsdps_clip(use_orig_params, tmp_path):
    """FullyShardedDataParallel (FSDP1) hands the optimizer flat params, or views of them with
    use_orig_params=True, whose grads are plain tensors holding each rank's shard: max_grad_norm
    computed the shard's norm and clipped each rank differently from FSDP's clip_grad_norm_ (a
    0.005 difference after 4 steps at lr 1e-2 in the probe), without a word. Now refused, at
    construction, in add_param_group (nothing added) and at the first step of an optimizer made
    before the wrapping (nothing changed), naming the alternative; that
    alternative, FSDP's clip then the step, is AdamW's. 8-bit states train there too and each
    rank's opt.state_dict() resumes them bit for bit."""
    out = tmp_path / "fsdp1.pt"
    spawn(_fsdp1, DIST_BACKENDS[0], use_orig_params, str(out))
    result = torch.load(out)
    assert result["refused"] == FSDP1_REFUSAL
    assert result["refused_late"] == FSDP1_REFUSAL and result["groups"] == 1
    if use_orig_params:
        assert result["refused_at_step"] == FSDP1_REFUSAL
        assert result["unchanged"]
    assert max_diff(result["snr"], result["adamw"]) <= 1e-6
    assert result["8bit_resumed_equal"] and result["8bit_moved"]


RESHARD_STEPS = 4  # the param goes from Shard(0) to Replicate() in place after half of them


def _reshard_data(complex_=False):
    """5 rows of 300: uneven shards (900 and 600 elements: 4 blocks and 3) whose 256-blocks are
    not the whole tensor's; or the same numbers as 5 rows of 150 complex."""
    gen = torch.Generator().manual_seed(0)
    full, grads = torch.randn(5, 300, generator=gen), [torch.randn(5, 300, generator=gen) for _ in range(RESHARD_STEPS)]
    if complex_:
        return torch.view_as_complex(full.view(5, 150, 2)), [torch.view_as_complex(g.view(5, 150, 2)) for g in grads]
    return full, grads


RESHARD_CASES = {"fp32 states": (torch.float32, False), "8-bit states": (torch.uint8, False),
                 "bf16 states, complex": (torch.bfloat16, True)}  # bf16 states of a complex param: real views


def _resharded(rank, port, backend, out):
    """A Shard(0) param resharded in place to Replicate() between steps (torch.utils.swap_tensors,
    as module.to() does under swap_module_params_on_conversion), its states laid out as before:
    fp32 states and bf16 states of a complex param (real views) adopted by the next step, 8-bit
    states by load_state_dict of the optimizer's own state_dict (a checkpoint of another layout),
    then stepped. The old code stepped none of them: a size mismatch halfway through adopting the
    states (fp32, bf16), a ValueError naming local shapes (8-bit). Then two 8-bit checkpoints that
    must be refused with nothing changed: scales holding fewer blocks than each shard needs, and
    codes on another mesh."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    _init(rank, port)
    mesh = init_device_mesh("cpu", (WORLD,))
    result = {}
    for case, (state_dtype, complex_) in RESHARD_CASES.items():
        full, grads = _reshard_data(complex_)
        p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
        opt = SNRAdamW([p], backend=backend, state_dtype=state_dtype, **HP)
        got = {}
        for k, g in enumerate(grads):
            if k == RESHARD_STEPS // 2:
                got["before"] = {key: t.full_tensor() for key, t in opt.decoded_state(p).items() if key != "step"}
                got["param before"] = p.full_tensor()
                torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().redistribute(mesh, [Replicate()])))
                if state_dtype == torch.uint8:
                    opt.load_state_dict(opt.state_dict())
                    got["adopted"] = {key: t.to_local().clone() for key, t in opt.state[p].items() if key != "step"}
            p.grad = distribute_tensor(g, mesh, p.placements)
            opt.step()
        got["param"] = p.full_tensor()
        got["states"] = {key: t.full_tensor() for key, t in opt.decoded_state(p).items() if key != "step"}
        got["placements"] = [str(t.placements) for t in opt.state[p].values() if isinstance(t, DTensor)]
        result[case] = got

    full, grads = _reshard_data()
    p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
    opt = SNRAdamW([p], backend=backend, state_dtype=torch.uint8, **HP)
    p.grad = distribute_tensor(grads[0], mesh, [Shard(0)])
    opt.step()
    saved = opt.state_dict()
    short = saved["state"][0]["exp_avg_scales"].to_local()[..., :2]  # 2 blocks a row; each shard needs 3 or more
    other_mesh = dict(saved["state"][0])  # valid scales, the codes on a mesh of their own
    saved["state"][0]["exp_avg_scales"] = DTensor.from_local(short, mesh, [Shard(0)], run_check=False,
                                                             shape=(WORLD, 2), stride=(2, 1))
    other_mesh["exp_avg_codes"] = DTensor.from_local(local(other_mesh["exp_avg_codes"]), DeviceMesh("cpu", [[0, 1]]),
                                                     [Shard(0), Replicate()], run_check=False, shape=full.shape,
                                                     stride=full.stride())
    for case, state in (("short", saved["state"][0]), ("other mesh", other_mesh)):
        before = [local(t).clone() for t in (p, *opt.state[p].values())]
        try:
            opt.load_state_dict({**saved, "state": {0: state}})
            result[case] = None
        except ValueError as e:
            result[case] = str(e)
        after = [local(t) for t in (p, *opt.state[p].values())]
        result[case + " unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after))
    if rank == 0:
        torch.save(result, out)
    _finish()


@pytest.mark.parametrize("backend", DIST_BACKENDS)
def test_a_param_resharded_in_place_between_steps_keeps_its_states(backend, tmp_path):
    """The truth: one process stepping the whole tensor (the update is elementwise, so fp32
    states are bit for bit the same), and for the 8-bit states adopted in the new layout, the
    reference's nearest codes of the decoded old states in the whole tensor's blocks (a
    Replicate() param's local shard is the whole tensor), then a plain twin loaded with them."""
    out = tmp_path / "resharded.pt"
    spawn(_resharded, backend, str(out))
    got = torch.load(out)
    for case in ("fp32 states", "bf16 states, complex"):
        state_dtype, complex_ = RESHARD_CASES[case]
        full, grads = _reshard_data(complex_)
        q = torch.nn.Parameter(full.clone())
        twin = SNRAdamW([q], backend=backend, state_dtype=state_dtype, **HP)
        for g in grads:
            q.grad = g.clone()
            twin.step()
        assert torch.equal(got[case]["param"], q.detach()), case
        for key in STATE_KEYS:
            assert torch.equal(got[case]["states"][key], twin.decoded_state(q)[key]), (case, key)
        assert got[case]["placements"] == ["(Replicate(),)"] * 3, case

    _, grads = _reshard_data()
    coded = got["8-bit states"]
    adopted = coded["adopted"]
    for key in STATE_KEYS:
        codes, scales, _ = reference.encode_8bit(coded["before"][key].double(), SIGNED[STATE_KEYS.index(key)])
        assert torch.equal(adopted[key + "_scales"].reshape(-1)[:scales.numel()], scales), key
        assert (adopted[key + "_codes"] != codes).sum() <= 2, key
    q = torch.nn.Parameter(coded["param before"].clone())
    twin = SNRAdamW([q], backend=backend, state_dtype=torch.uint8, **HP)
    twin.load_state_dict({"state": {0: {"step": torch.tensor(float(RESHARD_STEPS // 2)),
                                        **{k: v.reshape(-1) if k.endswith("_scales") else v
                                           for k, v in adopted.items()}}},
                          "param_groups": twin.state_dict()["param_groups"]})
    for g in grads[RESHARD_STEPS // 2:]:
        q.grad = g.clone()
        twin.step()
    assert torch.equal(coded["param"], q.detach())
    for key in STATE_KEYS:
        assert torch.equal(coded["states"][key], twin.decoded_state(q)[key]), key
    assert coded["placements"] == ["(Replicate(),)"] * 6

    assert got["short"] == ("state 'exp_avg_scales' of param 0 must be float32 of shape laid out by scales_layout, "
                            "(2, 4) (one scale per 256 elements), got torch.float32 (2, 2)")
    assert got["short unchanged"]
    assert got["other mesh"].startswith("state 'exp_avg_codes' of param 0 is a DTensor on another device mesh (")
    assert got["other mesh unchanged"]
