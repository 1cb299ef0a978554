"""Synchronised quantizers (``sync``) on 2 and 3 gloo ranks in spawned processes.

One world per rank count runs every scenario below in turn (spawning is the slow part);
each rank saves its results to a file and the tests compare them across ranks and with
one process fed the concatenation of the ranks' batches. The process group's timeout
turns a hang (a collective one rank does not make) into an error, and the world as a
whole is killed after ``WORLD_TIMEOUT`` seconds.
"""
import datetime
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastvae.nn import ResidualVectorQuantizer, VectorQuantizer
from fastvae.nn._sync import CodebookSync

WORLD_TIMEOUT = 240
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)
SIZES = {2: [6, 3], 3: [5, 0, 7]}  # rows per rank: uneven, and an empty rank
DIM, CODES, STEPS = 3, 8, 3
DEAD_THRESHOLD = 1.5
VQ_CONFIGS = {
    "ema": dict(ema_decay=0.9),
    "ema_debias_cosine": dict(ema_decay=0.8, ema_debias=True, cosine=True),
    "gradient": dict(ema_decay=None, sync=True),
    "gradient_dead_average": dict(ema_decay=None, dead_code_threshold=1e-3),
}


def global_batch(step, sizes, dim=DIM):
    generator = torch.Generator().manual_seed(100 + step)
    centres = 3 * torch.randn(4, dim, generator=generator)
    rows = centres[torch.randint(4, (sum(sizes),), generator=generator)]
    return rows + 0.3 * torch.randn(sum(sizes), dim, generator=generator)


def rank_slice(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def snapshot(module):
    state = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    for name, buffer in module.named_buffers():
        if name.endswith("perplexity"):
            state[name] = buffer.clone()
    return state


# ---------------------------------------------------------------- scenarios (run on every rank)
def scenario_vq(rank, sizes):
    results = {}
    for name, options in VQ_CONFIGS.items():
        torch.manual_seed(0)
        layer = VectorQuantizer(CODES, DIM, **options)
        for step in range(STEPS):
            layer(rank_slice(global_batch(step, sizes), sizes, rank))
        results[name] = snapshot(layer)
    return results


def scenario_kmeans(rank, sizes):
    torch.manual_seed(0)
    layer = VectorQuantizer(4, DIM, ema_decay=0.9, kmeans_init=True, kmeans_iters=3)
    torch.manual_seed(7)  # rank 0's default generator seeds the k-means draws
    for step in range(2):
        layer(rank_slice(global_batch(step, sizes), sizes, rank))
    return snapshot(layer)


def scenario_dead_codes(rank, sizes):
    # Far from the inputs, codes 4.. never win: dead after the first call (threshold above
    # the initial running usage, which decays by 0.99 per call).
    torch.manual_seed(0)
    layer = VectorQuantizer(16, DIM, dead_code_threshold=DEAD_THRESHOLD)
    with torch.no_grad():
        layer.codebook[4:] += 100.0
    torch.manual_seed(1 + rank)  # the candidates each rank draws differ
    states = [snapshot(layer)]
    for step in range(2):
        layer(rank_slice(global_batch(step, sizes), sizes, rank))
        states.append(snapshot(layer))
    return states


def scenario_pick_rows(rank, sizes):
    torch.manual_seed(10 + rank)
    rows = torch.full((sizes[rank], 2), float(rank))
    picked, found = CodebookSync(None).pick_rows(rows, 3000)
    return picked[:, 0], found


def scenario_residual(rank, sizes):
    results = {}
    for name, options in {"dropout": dict(quantize_dropout=True, ema_decay=0.9, dead_code_threshold=0.5),
                          "shared_kmeans": dict(shared_codebook=True, kmeans_init=True, ema_decay=0.9)}.items():
        torch.manual_seed(0)
        layer = ResidualVectorQuantizer(3, 4, DIM, **options)
        torch.manual_seed(5 + rank)  # ranks' default generators differ: the stage count must not
        counts = []
        for step in range(4):
            _, indices, _ = layer(rank_slice(global_batch(step, sizes), sizes, rank))
            counts.append(indices.shape[-1])
        results[name] = (counts, snapshot(layer))
    return results


class TinyAutoencoder(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(4, DIM), nn.Linear(DIM, 4)
        self.quantizer = VectorQuantizer(CODES, DIM, **options)

    def forward(self, x):
        quantized, _, loss = self.quantizer(self.encoder(x))
        return ((self.decoder(quantized) - x) ** 2).mean() + loss


def train_autoencoder(model, batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in batches:
        optimizer.zero_grad()
        model(x).backward()
        optimizer.step()


def ddp_batches(rank, world):
    """Equal batch sizes: DDP's mean of the ranks' gradients is then the global batch's."""
    sizes = [4] * world
    return [rank_slice(global_batch(step, sizes, 4), sizes, rank) for step in range(STEPS)]


def scenario_ddp(rank, sizes):
    from torch.nn.parallel import DistributedDataParallel
    results = {}
    for name, (options, broadcast_buffers) in {"ema_broadcast": (dict(ema_decay=0.9), True),
                                               "ema_no_broadcast": (dict(ema_decay=0.9), False),
                                               "gradient": (dict(), False)}.items():
        torch.manual_seed(0)
        model = TinyAutoencoder(**options)
        train_autoencoder(DistributedDataParallel(model, broadcast_buffers=broadcast_buffers),
                          ddp_batches(rank, len(sizes)))
        results[name] = snapshot(model)
    return results


def scenario_eval_makes_no_collective(rank, sizes):
    layer = VectorQuantizer(CODES, DIM, ema_decay=0.9, dead_code_threshold=0.5, kmeans_init=True).eval()
    if rank == 0:  # the other ranks never call it: a collective here would time out
        for step in range(3):
            layer(torch.randn(sizes[rank], DIM))
    dist.barrier()
    return True


def scenario_compiled(rank, sizes):
    torch.manual_seed(0)
    layer = VectorQuantizer(CODES, DIM, ema_decay=0.9, dead_code_threshold=0.5)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    for step in range(2):
        compiled(rank_slice(global_batch(step, sizes), sizes, rank))
    return snapshot(layer)


SCENARIOS = {name[len("scenario_"):]: function for name, function in globals().items()
             if name.startswith("scenario_")}


def _worker(rank, world, folder):
    torch.set_num_threads(1)
    results = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(rank, SIZES[world])
            except Exception:
                results[name] = RuntimeError(traceback.format_exc())
        dist.destroy_process_group()
    finally:
        torch.save(results, f"{folder}/rank{rank}.pt")


def run_world(world):
    """Every scenario on ``world`` ranks: ``{scenario: [rank 0's result, ...]}``."""
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        processes = [context.Process(target=_worker, args=(rank, world, folder)) for rank in range(world)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(WORLD_TIMEOUT)
        hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for process in processes:
            if process.is_alive():
                process.kill()
        assert not hung, f"ranks {hung} did not finish within {WORLD_TIMEOUT} s"
        per_rank = [torch.load(f"{folder}/rank{rank}.pt", weights_only=False) for rank in range(world)]
    return {name: [results.get(name, RuntimeError("not run")) for results in per_rank] for name in SCENARIOS}


@pytest.fixture(scope="module", params=sorted(SIZES))
def world(request):
    return request.param, run_world(request.param)


def ranks_results(world, scenario):
    size, results = world
    for rank, result in enumerate(results[scenario]):
        if isinstance(result, Exception):
            pytest.fail(f"scenario {scenario!r} failed on rank {rank} of {size}:\n{result}")
    return SIZES[size], results[scenario]


def assert_identical_across_ranks(states):
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        for name in state:
            torch.testing.assert_close(state[name], states[0][name], rtol=0, atol=0, equal_nan=True,
                                       msg=f"{name} differs across ranks")


def assert_matches(state, expected):
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("config", sorted(VQ_CONFIGS))
def test_vq_statistics_are_the_global_batchs(world, config):
    sizes, states = ranks_results(world, "vq")
    states = [state[config] for state in states]
    assert_identical_across_ranks(states)
    torch.manual_seed(0)
    options = {key: value for key, value in VQ_CONFIGS[config].items() if key != "sync"}
    reference = VectorQuantizer(CODES, DIM, sync=False, **options)
    for step in range(STEPS):
        reference(global_batch(step, sizes))
    assert_matches(states[0], snapshot(reference))
    assert torch.equal(states[0]["usage_count"], reference.usage_count)


def test_kmeans_init_fits_the_global_first_batch(world):
    sizes, states = ranks_results(world, "kmeans")
    assert_identical_across_ranks(states)
    torch.manual_seed(0)
    reference = VectorQuantizer(4, DIM, ema_decay=0.9, kmeans_init=True, kmeans_iters=3, sync=False)
    torch.manual_seed(7)
    seed = int(torch.randint(2 ** 62, (1,), dtype=torch.int64))  # rank 0's broadcast seed
    reference._sync.generator = lambda device: torch.Generator().manual_seed(seed)
    for step in range(2):
        reference(global_batch(step, sizes))
    assert_matches(states[0], snapshot(reference))


def test_dead_codes_restart_at_the_same_global_rows(world):
    sizes, rank_states = ranks_results(world, "dead_codes")
    for step_states in zip(*rank_states):
        assert_identical_across_ranks(list(step_states))
    initial, first, second = rank_states[0]
    reference = VectorQuantizer(16, DIM, dead_code_threshold=DEAD_THRESHOLD, sync=False)
    reference.load_state_dict({name: tensor for name, tensor in initial.items() if name != "perplexity"})
    reference(global_batch(0, sizes))
    assert_matches(first, snapshot(reference))  # nothing dead yet: the global running usage
    dead = first["ema_count"] < DEAD_THRESHOLD
    assert dead[4:].all()
    batch = global_batch(1, sizes)
    for code in dead.nonzero()[:, 0]:  # each restarted at a row of the second call's global batch
        assert (second["codebook"][code] == batch).all(1).any(), f"code {int(code)} is not a global batch row"
    assert torch.equal(second["codebook"][~dead], first["codebook"][~dead])
    second_counts = (second["usage_count"] - first["usage_count"]).float()
    torch.testing.assert_close(second["ema_count"][dead], 0.99 * DEAD_THRESHOLD + 0.01 * second_counts[dead])


def test_picked_rows_come_from_each_rank_in_proportion(world):
    sizes, results = ranks_results(world, "pick_rows")
    (picked, found), others = results[0], results[1:]
    for other_picked, other_found in others:
        assert torch.equal(other_picked, picked) and torch.equal(other_found, found)
    assert found.all()
    for rank, size in enumerate(sizes):
        share = (picked == rank).float().mean().item()
        expected = size / sum(sizes)
        assert abs(share - expected) < 5 * (expected * (1 - expected) / picked.numel()) ** 0.5 + 1e-9, (rank, share)


@pytest.mark.parametrize("config", ["dropout", "shared_kmeans"])
def test_residual_quantizer_same_stages_and_statistics(world, config):
    sizes, results = ranks_results(world, "residual")
    results = [result[config] for result in results]
    counts = results[0][0]
    assert all(result[0] == counts for result in results), "ranks drew different stage counts"
    assert_identical_across_ranks([result[1] for result in results])
    if config == "dropout":
        assert len(set(counts)) > 1, f"quantize_dropout drew {counts}"
        # dead_code_threshold=0.5 restarts no code within 4 calls: one process matches exactly
        torch.manual_seed(0)
        reference = ResidualVectorQuantizer(3, 4, DIM, quantize_dropout=True, ema_decay=0.9, dead_code_threshold=0.5,
                                            sync=False)
        for step, n in enumerate(counts):
            reference(global_batch(step, sizes), num_quantizers=n)
        assert_matches(results[0][1], snapshot(reference))


def test_ddp_training_matches_one_process(world):
    sizes, states = ranks_results(world, "ddp")
    for name, options in {"ema_broadcast": dict(ema_decay=0.9), "ema_no_broadcast": dict(ema_decay=0.9),
                          "gradient": dict()}.items():
        rank_states = [state[name] for state in states]
        assert_identical_across_ranks(rank_states)
        torch.manual_seed(0)
        reference = TinyAutoencoder(sync=False, **options)
        batches = [torch.cat(parts) for parts in zip(*(ddp_batches(rank, len(sizes)) for rank in range(len(sizes))))]
        train_autoencoder(reference, batches)
        assert_matches(rank_states[0], snapshot(reference))


def test_eval_makes_no_collective(world):
    _, results = ranks_results(world, "eval_makes_no_collective")
    assert all(results)


def test_compiled_with_sync_has_no_graph_break(world):
    sizes, states = ranks_results(world, "compiled")
    assert_identical_across_ranks(states)
    torch.manual_seed(0)
    reference = VectorQuantizer(CODES, DIM, ema_decay=0.9, dead_code_threshold=0.5, sync=False)
    for step in range(2):
        reference(global_batch(step, sizes))
    assert_matches(states[0], snapshot(reference))


def test_sync_option():
    with pytest.raises(ValueError, match="sync"):
        VectorQuantizer(4, 2, sync="yes")
    assert not CodebookSync(None).enabled and not CodebookSync(False).enabled
    layer = VectorQuantizer(4, 2, sync=True)
    layer.eval()(torch.randn(5, 2))  # no collective, nothing to check in eval
    with pytest.raises(RuntimeError, match="init_process_group"):
        layer.train()(torch.randn(5, 2))


@pytest.mark.parametrize("make", [
    lambda: VectorQuantizer(CODES, DIM, ema_decay=0.9, dead_code_threshold=0.5, kmeans_init=True, sync=True),
    lambda: ResidualVectorQuantizer(3, 4, DIM, ema_decay=0.9, dead_code_threshold=0.5, quantize_dropout=True,
                                    sync=True),
], ids=["VectorQuantizer", "ResidualVectorQuantizer"])
def test_synchronised_training_steps_make_no_host_sync(monkeypatch, tmp_path, make):
    from test_host_sync import no_host_sync
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        layer = make()
        layer(torch.randn(16, DIM))  # the first call may read on the host (k-means sizes, the dropout seed)
        with no_host_sync(monkeypatch):
            for _ in range(2):
                quantized, _, loss = layer(torch.randn(16, DIM, requires_grad=True))
                (quantized.sum() + loss.sum()).backward()
    finally:
        dist.destroy_process_group()
