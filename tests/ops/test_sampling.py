import pytest
import torch
from scipy.stats import chisquare

from pyvlm import ops
from pyvlm.ops import reference

from .conftest import assert_close, poisoned

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sample_poisoned(logits, num_top=0, **params):
    batch, dev = logits.shape[0], logits.device
    out = (poisoned(batch, dtype=torch.int64, device=dev),
           poisoned(batch, dtype=torch.float32, device=dev),
           poisoned(batch, num_top, dtype=torch.int64, device=dev),
           poisoned(batch, num_top, dtype=torch.float32, device=dev))
    params.setdefault("temperatures", 1.0)
    return ops.sample(logits, num_top=num_top, out=out, **params)


def stable_top(logits, num_top):
    """Top num_top of log_softmax, descending, lower index first on ties."""
    lp = torch.log_softmax(logits.double(), -1)
    order = torch.argsort(lp, dim=-1, descending=True, stable=True)[:, :num_top]
    return order, lp.gather(-1, order)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 10), (1, 1), (5, 7), (3, 152064), (4, 1001)])
def test_greedy_equals_argmax_with_logprobs(device, dtype, shape):
    logits = (torch.randn(*shape, device=device) * 4).to(dtype)
    num_top = min(5, shape[1])
    tokens, lp, top_ids, top_lp = sample_poisoned(logits, num_top, temperatures=0.0)
    assert torch.equal(tokens, logits.float().argmax(-1))
    ref_lp, _, _ = reference.logprobs(logits, tokens, 0)
    assert_close(lp, ref_lp, torch.float32)
    ids, vals = stable_top(logits, num_top)
    assert torch.equal(top_ids, ids)
    assert_close(top_lp, vals, torch.float32)


@pytest.mark.parametrize("num_top", [1, 3, 20])
def test_top_logprobs_with_ties_take_lowest_index(device, num_top):
    # Few distinct values: many ties at the num_top-th value.
    logits = torch.randint(-3, 3, (6, 300), device=device).float()
    logits[0] = 0.0
    tokens, lp, top_ids, top_lp = sample_poisoned(logits, num_top, temperatures=0.7,
                                                  seeds=torch.arange(6))
    ids, vals = stable_top(logits, num_top)
    assert torch.equal(top_ids, ids)
    assert_close(top_lp, vals, torch.float32)
    assert_close(lp, torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1),
                 torch.float32)


def test_greedy_ties_take_lowest_index(device):
    logits = torch.zeros(3, 64, device=device)
    logits[1, [7, 9, 40]] = 2.0
    logits[2, -1] = 1.0
    tokens = sample_poisoned(logits, temperatures=0.0)[0]
    assert tokens.tolist() == [0, 7, 63]


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_one_equals_greedy(device, dtype):
    logits = (torch.randn(16, 5000, device=device) * 3).to(dtype)
    tokens = sample_poisoned(logits, temperatures=1.5, top_ks=1, seeds=torch.arange(16))[0]
    # top-k is tie-inclusive: with 16-bit logits the maximum can be tied, and
    # any tied maximum is a valid draw; where it is unique it must be argmax.
    values = logits.float()
    row_max = values.max(-1).values
    assert torch.equal(values.gather(1, tokens[:, None])[:, 0], row_max)
    unique = (values == row_max[:, None]).sum(-1) == 1
    assert torch.equal(tokens[unique], values.argmax(-1)[unique])


DIST_CASES = {
    "temperature": dict(temperatures=0.8),
    "top_p": dict(temperatures=1.0, top_ps=0.7),
    "top_k": dict(temperatures=1.2, top_ks=6),
    "min_p": dict(temperatures=1.0, min_ps=0.08),
    "combined": dict(temperatures=1.3, top_ks=9, top_ps=0.85, min_ps=0.03),
}


def assert_matches_distribution(tokens, dist):
    counts = torch.bincount(tokens.cpu(), minlength=dist.numel()).double()
    assert counts[dist == 0].sum() == 0, "sampled a token outside the kept set"
    expected = dist * tokens.numel()
    big = expected >= 5  # chi-square needs reasonable expected counts: pool the rest
    obs = torch.cat([counts[big], counts[~big & (dist > 0)].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big & (dist > 0)].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    p = chisquare(obs.numpy(), exp.numpy()).pvalue
    assert p > 1e-5, f"chi-square p-value {p:.3g}"


def distribution_row(params, vocab=24):
    """A random logit row, tokens 3 and 5 tied, on which the test below is
    never vacuous: at least three kept tokens of probability >= 1% (so the
    chi-square has two degrees of freedom), at least one dropped token when
    params filter, and where a top-k or top-p cut exists the tie straddles
    it (were token 5 a hair lower, token 3 would be kept and 5 dropped), so
    both must be kept together. A plain random row misses these in a few
    percent of draws (top_p or min_p keeping a single token: p-value NaN)."""
    for _ in range(100):
        rows = torch.randn(4096, vocab) * 1.5
        rows[:, 3] = rows[:, 5]
        dist = reference.kept_distribution(rows, **params)
        ok = (dist >= 0.01).sum(-1) >= 3
        if set(params) - {"temperatures"}:
            ok &= (dist == 0).any(-1)
        if "top_ks" in params or "top_ps" in params:
            lower = rows.clone()
            lower[:, 5] -= 1e-3
            untied = reference.kept_distribution(lower, **params)
            ok &= (untied[:, 3] > 0) & (untied[:, 5] == 0)
        if ok.any():
            return rows[ok.nonzero()[0, 0]]
    raise AssertionError(f"no random row fits {params}")


@pytest.mark.parametrize("case", list(DIST_CASES))
def test_distribution_matches_kept_probabilities(device, case):
    draws, vocab = 20000, 24
    params = DIST_CASES[case]
    row = distribution_row(params, vocab).to(device)
    assert row[3] == row[5]  # a tie: both must be kept or dropped together
    logits = row.expand(draws, vocab).contiguous()
    seed = int(torch.randint(0, 2**62, ()).item())
    tokens = sample_poisoned(logits, seeds=seed, steps=torch.arange(draws, device=device), **params)[0]
    dist = reference.kept_distribution(row[None].cpu(), **params)[0]
    assert_matches_distribution(tokens, dist)


def test_tokens_stay_in_kept_set(device):
    batch, vocab = 64, 3000
    logits = torch.randn(batch, vocab, device=device) * 3
    params = dict(temperatures=torch.rand(batch) * 2,
                  top_ks=torch.randint(-1, 60, (batch,), dtype=torch.int32),
                  top_ps=torch.rand(batch).clamp_min(0.05),
                  min_ps=torch.rand(batch) * 0.2)
    dev_params = {k: v.to(device) for k, v in params.items()}
    tokens = sample_poisoned(logits, seeds=torch.randint(0, 2**40, (batch,)).to(device),
                             **dev_params)[0]
    dist = reference.kept_distribution(logits.cpu(), **params)
    assert (dist.gather(-1, tokens.cpu()[:, None]) > 0).all()


def test_seeded_token_is_batch_invariant(device):
    vocab = 5000
    row = torch.randn(vocab, device=device) * 2
    params = dict(temperatures=1.0, top_ps=0.95, top_ks=200, min_ps=0.0)
    alone = sample_poisoned(row[None], seeds=1234, steps=17, **params)[0]
    for _ in range(3):
        batch = torch.randn(8, vocab, device=device) * 2
        batch[5] = row
        seeds = torch.randint(0, 2**40, (8,), device=device)
        steps = torch.randint(0, 100, (8,), device=device)
        seeds[5], steps[5] = 1234, 17
        tokens = sample_poisoned(batch, seeds=seeds, steps=steps, **params)[0]
        assert tokens[5] == alone[0]


def test_different_seeds_and_steps_differ(device):
    logits = torch.zeros(256, 1000, device=device)  # uniform: every token equally likely
    by_seed = sample_poisoned(logits, seeds=torch.arange(256, device=device))[0]
    by_step = sample_poisoned(logits, seeds=7, steps=torch.arange(256, device=device))[0]
    assert by_seed.unique().numel() > 200 and by_step.unique().numel() > 200
    again = sample_poisoned(logits, seeds=torch.arange(256, device=device))[0]
    assert torch.equal(by_seed, again)


def row_lengths(batch, max_per_row, vocab):
    """Random CSR row lengths in [0, max_per_row); row 0 has at least two
    entries, so every non-empty batch has something to penalize."""
    lengths = torch.randint(0, min(max_per_row, vocab + 1), (batch,))
    if batch > 0:
        lengths[0] = max(int(lengths[0]), min(2, vocab))
    return lengths


def make_penalty_inputs(batch, vocab, device, dtype, max_per_row=40):
    """Random penalty CSR rows (empty rows included) with logit bias rows.
    With batch > 0 there is always a prompt-only token (count 0), a token
    seen in the output (count > 0) and a biased token, in row 0."""
    logits = (torch.randn(batch, vocab) * 3).to(dtype)
    lengths = row_lengths(batch, max_per_row, vocab)
    ids = torch.cat([torch.randperm(vocab)[:n] for n in lengths.tolist()] + [torch.empty(0)]).long()
    counts = torch.randint(0, 4, (ids.numel(),), dtype=torch.int32)
    if batch > 0:
        counts[0], counts[1] = 0, int(torch.randint(1, 4, ()))
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    b_lengths = row_lengths(batch, 5, vocab)
    b_ids = torch.cat([torch.randperm(vocab)[:n] for n in b_lengths.tolist()] + [torch.empty(0)]).long()
    b_vals = torch.randn(b_ids.numel())
    b_cu = torch.cat([torch.zeros(1, dtype=torch.int32), b_lengths.cumsum(0).int()])
    pen = (torch.rand(batch), torch.rand(batch) * 0.5, 0.5 + torch.rand(batch))
    args = (ids, counts, cu, *pen, b_ids, b_vals, b_cu)
    return logits.to(device), tuple(a.to(device) for a in args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,vocab", [(0, 10), (1, 5), (13, 1000), (4, 152064)])
def test_penalties_match_reference(device, dtype, batch, vocab):
    logits, args = make_penalty_inputs(batch, vocab, device, dtype)
    ref = reference.apply_penalties(logits, *args)
    out = ops.apply_penalties(logits.clone(), *args).double()
    # fp32: float32 arithmetic; 16-bit: rounded after the penalties and after the bias.
    ulp = {torch.float32: 1e-6, torch.float16: 2 * 2**-11, torch.bfloat16: 2 * 2**-8}[dtype]
    tol = ulp * ref.abs() + (1e-6 if dtype == torch.float32 else 2 * ulp)
    assert ((out - ref).abs() <= tol).all()


def test_opcheck(device):
    logits = torch.randn(4, 100, device=device)
    row = lambda v, dt: torch.full((4,), v, dtype=dt, device=device)  # noqa: E731
    out = (torch.empty(4, dtype=torch.int64, device=device), torch.empty(4, device=device),
           torch.empty(4, 3, dtype=torch.int64, device=device), torch.empty(4, 3, device=device))
    args = (*out, logits, row(0.9, torch.float32), row(10, torch.int32), row(0.9, torch.float32),
            row(0.01, torch.float32), row(3, torch.int64), row(2, torch.int64))
    torch.library.opcheck(torch.ops.pyvlm.sample.default, args)
    logits, pargs = make_penalty_inputs(4, 100, device, torch.float32)
    torch.library.opcheck(torch.ops.pyvlm.apply_penalties.default, (logits, *pargs))


def test_bad_sample_inputs_raise_naming_argument():
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match="top_ps"):
        ops.sample(logits, 1.0, top_ps=1.5)
    with pytest.raises(ValueError, match="top_ps"):
        ops.sample(logits, 1.0, top_ps=0.0)
    with pytest.raises(ValueError, match="min_ps"):
        ops.sample(logits, 1.0, min_ps=-0.1)
    with pytest.raises(ValueError, match="temperatures"):
        ops.sample(logits, float("nan"))
    with pytest.raises(ValueError, match="num_top"):
        ops.sample(logits, 1.0, num_top=21)
    with pytest.raises(ValueError, match="logits must be contiguous"):
        ops.sample(torch.randn(10, 3).t(), 1.0)
    with pytest.raises(ValueError, match="logits must have 2"):
        ops.sample(torch.randn(10), 1.0)
    with pytest.raises(ValueError, match="temperatures.size"):
        ops.sample(logits, torch.ones(2))
    out = (torch.empty(3, dtype=torch.int32), torch.empty(3), torch.empty(3, 0, dtype=torch.int64),
           torch.empty(3, 0))
    with pytest.raises(ValueError, match="out_tokens must have dtype"):
        ops.sample(logits, 1.0, out=out)
    with pytest.raises(ValueError, match="top_ks must have dtype"):
        torch.ops.pyvlm.sample(torch.empty(3, dtype=torch.int64), torch.empty(3),
                               torch.empty(3, 0, dtype=torch.int64), torch.empty(3, 0), logits,
                               torch.ones(3), torch.ones(3), torch.ones(3), torch.zeros(3),
                               torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))


def test_bad_penalty_inputs_raise_naming_argument():
    logits, args = make_penalty_inputs(3, 50, "cpu", torch.float32, max_per_row=5)
    ids, counts, cu, pres, freq, rep, b_ids, b_vals, b_cu = args

    def call(**changes):
        named = dict(token_ids=ids, output_counts=counts, cu_token_rows=cu, presence_penalties=pres,
                     frequency_penalties=freq, repetition_penalties=rep, bias_token_ids=b_ids,
                     bias_values=b_vals, cu_bias_rows=b_cu)
        named.update(changes)
        ops.apply_penalties(logits.clone(), **named)

    with pytest.raises(IndexError, match="token_ids"):
        call(token_ids=torch.full_like(ids, 50))
    with pytest.raises(IndexError, match="bias_token_ids"):
        call(bias_token_ids=torch.full_like(b_ids, -1))
    with pytest.raises(ValueError, match="output_counts must be >= 0"):
        call(output_counts=torch.full_like(counts, -1))
    with pytest.raises(ValueError, match="repetition_penalties"):
        call(repetition_penalties=torch.zeros(3))
    with pytest.raises(ValueError, match="cu_token_rows"):
        call(cu_token_rows=cu.flip(0).contiguous())
    with pytest.raises(ValueError, match="cu_token_rows"):
        call(cu_token_rows=cu[:-1].contiguous())
    with pytest.raises(ValueError, match="output_counts.size"):
        call(output_counts=torch.cat([counts, counts[:1]]))
    with pytest.raises(ValueError, match="token_ids must be unique"):
        dup = torch.tensor([4, 4], dtype=torch.int64)
        call(token_ids=dup, output_counts=torch.zeros(2, dtype=torch.int32),
             cu_token_rows=torch.tensor([0, 2, 2, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="bias_values must have dtype"):
        call(bias_values=b_vals.double())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_greedy_and_top_logprobs_identical_to_cpu(dtype):
    logits = (torch.randn(64, 152064) * 4).to(dtype)
    cpu = ops.sample(logits, 0.0, num_top=20)
    gpu = [t.cpu() for t in ops.sample(logits.cuda(), 0.0, num_top=20)]
    assert torch.equal(cpu[0], gpu[0]) and torch.equal(cpu[2], gpu[2])
    assert_close(gpu[1], cpu[1].double(), torch.float32)
    assert_close(gpu[3], cpu[3].double(), torch.float32)


@pytest.mark.cuda
def test_cuda_seeded_sampling_deterministic_and_agrees_with_cpu():
    batch, vocab = 256, 32000
    logits = torch.randn(batch, vocab) * 3
    params = dict(temperatures=torch.rand(batch) + 0.3,
                  top_ks=torch.randint(0, 100, (batch,), dtype=torch.int32),
                  top_ps=torch.rand(batch).clamp_min(0.3), min_ps=torch.rand(batch) * 0.05,
                  seeds=torch.randint(0, 2**62, (batch,)), steps=torch.randint(0, 1000, (batch,)))
    cpu = ops.sample(logits, **params)[0]
    gpu_params = {k: v.cuda() for k, v in params.items()}
    first = ops.sample(logits.cuda(), **gpu_params)[0]
    second = ops.sample(logits.cuda(), **gpu_params)[0]
    assert torch.equal(first, second)
    # Same Philox stream and threshold; only float rounding of exp/log (fast
    # math on the GPU) or of the top-p mass sums can flip a near-tie.
    agree = (first.cpu() == cpu).float().mean().item()
    assert agree >= 0.98, f"CUDA and CPU tokens agree in only {agree:.1%} of rows"


@pytest.mark.cuda
def test_cuda_penalties_identical_to_cpu():
    for dtype in DTYPES:
        logits, args = make_penalty_inputs(32, 32000, "cpu", dtype)
        cpu = ops.apply_penalties(logits.clone(), *args)
        gpu = ops.apply_penalties(logits.cuda(), *(a.cuda() for a in args))
        assert torch.equal(cpu, gpu.cpu())


def route_rows(route, batch, vocab):
    """Rows that take each route of the CUDA sampler (csrc/kernels/cuda/sampling.cuh)."""
    if route == "gathered":  # the thread maxima bound the cut: a few hundred candidates
        return torch.randn(batch, vocab) * 3, dict(temperatures=0.8, top_ks=50, top_ps=0.9)
    if route == "peaked":  # the 50th logit lies far below the first: still a few candidates
        logits = torch.randn(batch, vocab) * 3
        logits[torch.arange(batch), torch.randint(0, vocab, (batch,))] = 60.0
        return logits, dict(temperatures=1.0, top_ks=50)
    if route == "bin_pass":  # flat: the maxima carry too little mass to bound top-p
        return torch.randn(batch, vocab) * 0.3, dict(temperatures=1.5, top_ps=0.95)
    # Five values: the threshold bin (a fifth of the row, all tied) overflows
    # shared memory, so the radix selects run.
    params = dict(temperatures=1.0, top_ks=50, top_ps=0.5)
    return torch.randint(-2, 3, (batch, vocab)).float(), params


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [152064, 100003])  # 100003: unaligned rows, a partial chunk
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("route", ["gathered", "peaked", "bin_pass", "radix"])
def test_cuda_sampling_routes_agree_with_cpu(route, dtype, vocab):
    batch = 32
    logits, params = route_rows(route, batch, vocab)
    logits = logits.to(dtype)
    seeds, steps = torch.randint(0, 2**62, (batch,)), torch.randint(0, 1000, (batch,))
    cpu = ops.sample(logits, num_top=20, seeds=seeds, steps=steps, **params)
    def on_gpu():
        out = ops.sample(logits.cuda(), num_top=20, seeds=seeds.cuda(), steps=steps.cuda(), **params)
        return [t.cpu() for t in out]

    gpu = on_gpu()
    assert torch.equal(gpu[0], on_gpu()[0])  # fixed-point masses: the cut ignores atomic order
    kept = reference.kept_distribution(logits, **params)
    assert (kept.gather(-1, gpu[0][:, None]) > 0).all(), "sampled a token outside the kept set"
    # Same Philox stream and cut; only float rounding near a tie may flip a row.
    same = gpu[0] == cpu[0]
    assert (~same).sum() <= 1
    assert_close(gpu[1][same], cpu[1][same].double(), torch.float32)
    assert torch.equal(gpu[2], cpu[2])
    assert_close(gpu[3], cpu[3].double(), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_masked_rows_identical_to_cpu(dtype):
    # Constrained decoding leaves a few finite logits: fewer than num_top, so
    # the top list goes on with the lowest-index -inf tokens.
    batch, vocab = 8, 152064
    logits = torch.full((batch, vocab), float("-inf"))
    for r in range(batch):
        logits[r, torch.randperm(vocab)[:7]] = torch.randn(7) * 2
    logits = logits.to(dtype)
    params = dict(temperatures=torch.tensor([0.0, 1.0] * 4), top_ks=50, seeds=torch.arange(batch))
    cpu = ops.sample(logits, num_top=20, **params)
    gpu = [t.cpu() for t in ops.sample(logits.cuda(), num_top=20,
                                       **{k: v.cuda() if isinstance(v, torch.Tensor) else v
                                          for k, v in params.items()})]
    assert torch.equal(gpu[0], cpu[0]) and torch.equal(gpu[2], cpu[2])
    assert_close(gpu[1], cpu[1].double(), torch.float32)
    finite = torch.isfinite(cpu[3])
    assert torch.equal(torch.isfinite(gpu[3]), finite) and finite.sum(-1).eq(7).all()
    assert_close(gpu[3][finite], cpu[3][finite].double(), torch.float32)
