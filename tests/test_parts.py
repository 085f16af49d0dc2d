"""The parts of chapters 05-07 (`hvae_nb.cells`, `hvae_nb.spectral`, `hvae_nb.iaf`) against references written here,
so that `pytest` alone fails when one of them breaks (the chapters check them too, but only when they are run).

Each reference is independent of the code it checks: the singular values of `torch.linalg` (an SVD) for the power
iterations, brute force (perturb one input at a time) for the masks' order, `torch.autograd.functional.jacobian` and
`slogdet` for the flows' log-determinants, plain sums and `F.conv2d` for batch norm, squeeze-and-excitation and the
cells, and a count of NVAE's layers as the official `neural_operations.py` defines them (`Conv2D`, `BNSwishConv`,
`FactorizedReduce`, `InvertedResidual`, `SE`) for the parameters of every cell kind. Small sizes, double precision:
the file runs in seconds."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hvae_nb.cells import CELL_KINDS, SqueezeExcite, WeightNormConv2d, batch_norm, make_cell, official_cell_parameters
from hvae_nb.iaf import FlowPair, IAFStep, MaskedConv2d, NVAEFlowCell
from hvae_nb.spectral import SpectralRegularizer, power_iteration, spectral_penalty, weight_matrix

# NVAE's constants: batch norm's momentum 0.05 and eps 1e-5 everywhere, out = skip(x) + 0.1 * SE(ops(x)) in every
# cell, and the weight-normalised kernel exp(log_weight_norm) * v / (|v| + 1e-5)
BN_EPS, BN_MOMENTUM, RESIDUAL_SCALE, NORM_EPS = 1e-5, 0.05, 0.1, 1e-5


def generator(seed: int) -> torch.Generator: return torch.Generator().manual_seed(seed)


def unit_rows(t: torch.Tensor) -> torch.Tensor: return t / t.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------ spectral: power iteration against the SVD

def matrix_with_spectrum(spectrum: torch.Tensor, rows: int, cols: int, seed: int) -> torch.Tensor:
    "U diag(spectrum) V^T with random orthonormal U, V (QR of Gaussian matrices): a matrix whose SVD we chose."
    g = generator(seed)
    left = torch.linalg.qr(torch.randn(rows, len(spectrum), generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(cols, len(spectrum), generator=g, dtype=torch.float64))[0]
    return left @ torch.diag(spectrum.double()) @ right.T


def test_batched_power_iteration_finds_each_matrix_top_singular_pair():
    "A stack of matrices of one shape, each with its own scale and gap: every one gets its own sigma_1, u_1, v_1."
    rows, cols = 12, 30
    stack = torch.stack([matrix_with_spectrum((2 + i) * gap ** torch.arange(rows), rows, cols, seed=i)
                         for i, gap in enumerate((0.3, 0.5, 0.7, 0.8, 0.9))]
                        + [torch.randn(rows, cols, generator=generator(9), dtype=torch.float64)])  # no gap chosen
    g = generator(1)
    left = unit_rows(torch.randn(len(stack), rows, generator=g))
    right = unit_rows(torch.randn(len(stack), cols, generator=g))
    kept = left.clone(), right.clone()
    u, v = power_iteration(stack, left, right, iterations=300)
    assert torch.equal(left, kept[0]) and torch.equal(right, kept[1])        # the start vectors are not overwritten
    U, S, Vh = torch.linalg.svd(stack)
    estimate = torch.einsum('lr,lrc,lc->l', u, stack, v)
    torch.testing.assert_close(estimate, S[:, 0], rtol=1e-10, atol=0)
    torch.testing.assert_close(estimate, torch.linalg.matrix_norm(stack, ord=2), rtol=1e-10, atol=0)
    # the singular vectors themselves, up to their sign
    assert ((u * U[:, :, 0]).sum(1).abs() > 1 - 1e-10).all() and ((v * Vh[:, 0]).sum(1).abs() > 1 - 1e-10).all()


def test_a_kernel_reshaped_is_the_map_from_a_patch_to_a_pixel_and_its_norm_is_found():
    "(C_out, C_in, k, k) -> (C_out, C_in k k), checked against F.conv2d of one-hot patches; then its sigma_1."
    kernel = torch.randn(8, 4, 3, 3, generator=generator(2), dtype=torch.float64)
    patches = torch.eye(4 * 9, dtype=torch.float64).reshape(36, 4, 3, 3)       # one input patch per basis vector
    patch_map = F.conv2d(patches, kernel).reshape(36, 8).T                      # column j: the pixel patch j makes
    torch.testing.assert_close(weight_matrix(kernel), patch_map, rtol=0, atol=1e-12)
    conv = nn.Conv2d(4, 8, 3).double()
    with torch.no_grad(): conv.weight.copy_(kernel)
    regularizer = SpectralRegularizer([conv], iterations=4, first_iterations=40)
    for _ in range(50): estimate = regularizer()
    torch.testing.assert_close(estimate[0].detach(), torch.linalg.svdvals(patch_map)[0], rtol=1e-9, atol=0)


def applied_kernel(layer: nn.Module) -> torch.Tensor:
    "The weight a layer applies, from the weight-normalisation formula where the layer has a length parameter."
    if not hasattr(layer, 'log_weight_norm'): return layer.weight
    norm = layer.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return layer.log_weight_norm.exp() * layer.weight / (norm + NORM_EPS)


def exact_norm(layer: nn.Module) -> torch.Tensor:
    kernel = applied_kernel(layer)
    return torch.linalg.matrix_norm(kernel.reshape(kernel.shape[0], -1), ord=2)


def test_the_persistent_regulariser_converges_over_calls_and_its_gradient_is_the_exact_norms():
    """Layers of three shapes (two share a shape, so they iterate as one batch), one weight-normalised: after the
    first call's 40 iterations the hard layer (a gap of 0.99) is still off; 300 calls of 4 more from the stored
    vectors bring every estimate to sigma_1 of the weight the layer applies, and the penalty's gradient to that of
    lambda * sigma_1 through the SVD."""
    torch.manual_seed(3)
    slow = nn.Linear(36, 8).double()
    with torch.no_grad(): slow.weight.copy_(matrix_with_spectrum(0.99 ** torch.arange(8), 8, 36, seed=4))
    normalised = WeightNormConv2d(4, 8, 3).double()
    with torch.no_grad(): normalised.log_weight_norm.add_(0.5 * torch.randn_like(normalised.log_weight_norm))
    layers = [nn.Linear(20, 12).double(), nn.Linear(20, 12).double(), nn.Conv2d(4, 8, 3).double(), normalised, slow]
    regularizer = SpectralRegularizer(layers)
    exact = torch.stack([exact_norm(layer) for layer in layers]).detach()
    first = (exact - regularizer().detach()) / exact
    assert first[-1] > 1e-4, first          # 40 iterations are not enough for this one: what follows is persistence
    for _ in range(300): estimates = regularizer()
    torch.testing.assert_close(estimates.detach(), exact, rtol=1e-9, atol=0)
    # the weight-normalised layer is measured by the kernel it applies, not by its direction v
    v = normalised.weight.detach()
    assert not torch.isclose(exact[3], torch.linalg.matrix_norm(v.reshape(8, -1), ord=2), rtol=0.01)
    parameters = [p for layer in layers for p in layer.parameters() if p.dim() > 1 or p is normalised.log_weight_norm]
    for squared in (False, True):
        got = torch.autograd.grad(spectral_penalty(regularizer(), 0.1, squared=squared), parameters)
        sigmas = torch.stack([exact_norm(layer) for layer in layers])
        reference = 0.05 * sigmas.pow(2).sum() if squared else 0.1 * sigmas.sum()
        for a, b in zip(got, torch.autograd.grad(reference, parameters)):
            assert (a - b).norm() < 1e-7 * b.norm(), ((a - b).norm() / b.norm()).item()


def test_a_layer_that_starts_at_zero_is_picked_up_when_it_moves():
    layer = nn.Linear(6, 5).double()
    nn.init.zeros_(layer.weight)
    regularizer = SpectralRegularizer([layer])
    assert regularizer().item() == 0.0
    with torch.no_grad(): layer.weight.copy_(torch.randn(5, 6, generator=generator(5), dtype=torch.float64))
    for _ in range(40): estimate = regularizer()
    torch.testing.assert_close(estimate[0].detach(), torch.linalg.matrix_norm(layer.weight.detach(), ord=2),
                               rtol=1e-9, atol=0)


# ------------------------------------------------------------------ iaf: the order, by brute force

def order_keys(shape, reverse: bool) -> list[tuple[int, int]]:
    "The place in the flow's order of every flat index of a (C, H, W) tensor: (pixel in raster order, channel)."
    channels, height, width = shape
    keys = []
    for c in range(channels):
        for row in range(height):
            for col in range(width):
                pixel = row * width + col
                keys.append((height * width - 1 - pixel if reverse else pixel, c))
    return keys


def dependencies(function, shape) -> torch.Tensor:
    "D[i, j]: does output i change when input j alone moves? One input at a time, in double precision."
    x = torch.randn(1, *shape, generator=generator(6), dtype=torch.float64)
    with torch.no_grad():
        before = function(x).flatten()
        columns = []
        for j in range(x.numel()):
            moved = x.flatten().clone()
            moved[j] += 1.0
            columns.append(function(moved.view_as(x)).flatten() != before)
    return torch.stack(columns, 1)


def order_relation(shape, reverse: bool, strict: bool) -> torch.Tensor:
    "R[i, j]: input j comes before output i in the order (or is i itself, unless `strict`)."
    keys = order_keys(shape, reverse)
    return torch.tensor([[kj < ki or (not strict and kj == ki) for kj in keys] for ki in keys])


def within(shape, reach: int) -> torch.Tensor:
    "W[i, j]: input j lies in the (2 reach + 1)^2 window around output i's pixel."
    channels, height, width = shape
    rows = torch.arange(height).repeat_interleave(width).repeat(channels)
    cols = torch.arange(width).repeat(height).repeat(channels)
    return ((rows[:, None] - rows[None]).abs() <= reach) & ((cols[:, None] - cols[None]).abs() <= reach)


def perturbed(module: nn.Module, seed: int, amount: float = 0.5) -> nn.Module:
    """The module in double precision with every parameter moved by noise and every weight-normalised kernel three
    times longer: far from the near-identity start of a flow."""
    g = generator(seed)
    module = module.double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(amount * torch.randn(p.shape, generator=g, dtype=p.dtype))
            if name.endswith('log_weight_norm'): p.add_(math.log(3))
    return module


@pytest.mark.parametrize('kernel_size', [3, 5])
@pytest.mark.parametrize('include_centre', [False, True])
@pytest.mark.parametrize('depthwise', [False, True])
@pytest.mark.parametrize('reverse', [False, True])
def test_a_masked_convolution_reads_exactly_the_earlier_inputs_of_its_window(kernel_size, include_centre,
                                                                               depthwise, reverse):
    shape = (3, 4, 4)
    layer = perturbed(MaskedConv2d(3, 3, kernel_size, include_centre, depthwise, reverse), seed=7)
    expected = within(shape, kernel_size // 2) & order_relation(shape, reverse, strict=not include_centre)
    if depthwise:                                          # each channel reads only itself
        channel = torch.arange(3).repeat_interleave(16)
        expected &= channel[:, None] == channel[None]
    assert torch.equal(dependencies(layer, shape), expected)


@pytest.mark.parametrize('reverse', [False, True])
def test_the_flows_are_autoregressive_in_their_order(reverse):
    """IAF's network (m, s) and NVAE's shift mu read only earlier dimensions (not their own); the whole step reads
    earlier ones and its own. Widening and narrowing masks included (channels 2 -> 8 -> 2, and x6 in NVAE's cell)."""
    shape = (2, 4, 4)
    strictly_before = order_relation(shape, reverse, strict=True)
    context = torch.randn(1, 3, 4, 4, generator=generator(8), dtype=torch.float64)
    step = perturbed(IAFStep(2, 8, context_channels=3, reverse=reverse), seed=9)
    cell = perturbed(NVAEFlowCell(2, reverse=reverse), seed=10)
    for name, function in [('IAF mean', lambda z: step.mean_and_gate_logit(z, context)[0]),
                           ('IAF gate', lambda z: step.mean_and_gate_logit(z, context)[1]),
                           ('NVAE shift', cell.shift)]:
        found = dependencies(function, shape)
        assert not (found & ~strictly_before).any(), name               # nothing later, nor itself
        first = min(range(32), key=order_keys(shape, reverse).__getitem__)
        reads = found.any(1)
        assert not reads[first] and reads.sum() == 31, name             # every output but the first reads some
    for name, flow in (('IAF step', step), ('NVAE cell', cell)):
        found = dependencies(lambda z: flow(z, context)[0], shape)
        assert torch.equal(found & ~strictly_before, torch.eye(32, dtype=torch.bool)), name   # earlier, and itself


def jacobian(flow, z: torch.Tensor, context=None) -> torch.Tensor:
    "d flow(z) / d z for one example, as a (CHW, CHW) matrix, by torch.autograd.functional.jacobian."
    return torch.autograd.functional.jacobian(lambda flat: flow(flat.view(1, *z.shape), context)[0].flatten(),
                                              z.flatten())


@pytest.mark.parametrize('reverse', [False, True])
def test_the_iaf_log_determinant_is_the_jacobians(reverse):
    z = torch.randn(2, 4, 4, generator=generator(11), dtype=torch.float64)
    context = torch.randn(1, 3, 4, 4, generator=generator(12), dtype=torch.float64)
    step = perturbed(IAFStep(2, 8, context_channels=3, reverse=reverse), seed=13)
    sign, log_abs_det = torch.linalg.slogdet(jacobian(step, z, context))
    _, log_det = step(z[None], context)
    assert sign == 1 and abs(log_abs_det) > 1                 # a gate sigma in (0, 1): a contraction, far from 1
    torch.testing.assert_close(log_det[0], log_abs_det, rtol=0, atol=1e-10)
    # the batch: each example's own log-determinant
    batch = torch.stack([z, 2 * z])
    both = step(batch, context.expand(2, -1, -1, -1))[1]
    torch.testing.assert_close(both[1], torch.linalg.slogdet(jacobian(step, 2 * z, context))[1], rtol=0, atol=1e-10)


def test_nvae_flow_cells_preserve_volume():
    "One cell, each order, and a pair: log|det J| = 0 by slogdet, as the cell reports, though J is far from I."
    z = torch.randn(2, 4, 4, generator=generator(14), dtype=torch.float64)
    flows = {'cell': perturbed(NVAEFlowCell(2), seed=15), 'reversed cell': perturbed(NVAEFlowCell(2, reverse=True), 16),
             'pair': perturbed(FlowPair(2), seed=17)}
    for name, flow in flows.items():
        full = jacobian(flow, z)
        sign, log_abs_det = torch.linalg.slogdet(full)
        assert sign == 1 and abs(log_abs_det) < 1e-10, (name, log_abs_det)
        assert flow(z[None])[1].tolist() == [0.0], name
        assert (full - torch.eye(32, dtype=torch.float64)).abs().max() > 0.01, name    # the shift does something
    pair_jacobian = jacobian(flows['pair'], z)
    order = torch.tensor(sorted(range(32), key=order_keys((2, 4, 4), False).__getitem__))
    ordered = pair_jacobian[order][:, order]
    assert torch.triu(ordered, 1).abs().max() > 0 and torch.tril(ordered, -1).abs().max() > 0   # full, not triangular


# ------------------------------------------------------------------ cells: the definitions, in sums and F.conv2d

def test_batch_norm_is_its_definition_in_plain_sums():
    "Training output, running estimates (momentum 0.05, unbiased variance) and evaluation output, one number at a time."
    bn = batch_norm(5).double()
    with torch.no_grad(): bn.weight.uniform_(0.5, 2); bn.bias.normal_()
    x = 3 + 2 * torch.randn(6, 5, 3, 4, generator=generator(18), dtype=torch.float64)
    trained = bn(x)
    bn.eval()
    evaluated = bn(x)
    for c in range(5):
        values = x[:, c].flatten().tolist()
        n = len(values)
        mean = sum(values) / n
        biased = sum((v - mean) ** 2 for v in values) / n
        running_mean = (1 - BN_MOMENTUM) * 0.0 + BN_MOMENTUM * mean
        running_var = (1 - BN_MOMENTUM) * 1.0 + BN_MOMENTUM * biased * n / (n - 1)
        gamma, beta = bn.weight[c].item(), bn.bias[c].item()
        assert abs(bn.running_mean[c].item() - running_mean) < 1e-12
        assert abs(bn.running_var[c].item() - running_var) < 1e-12
        for got, mu, var in ((trained, mean, biased), (evaluated, running_mean, running_var)):
            expected = [gamma * (v - mu) / math.sqrt(var + BN_EPS) + beta for v in values]
            assert max(abs(a - b) for a, b in zip(got[:, c].flatten().tolist(), expected)) < 1e-10


def gates_in_sums(se: nn.Module, x: torch.Tensor) -> torch.Tensor:
    "sigmoid(W2 relu(W1 a + b1) + b2), a the channel means: NVAE's SE, in plain Python sums."
    first, second = [m for m in se.modules() if isinstance(m, nn.Linear)]
    W1, b1, W2, b2 = first.weight.tolist(), first.bias.tolist(), second.weight.tolist(), second.bias.tolist()
    gates = []
    for image in x:
        means = [sum(channel.flatten().tolist()) / channel.numel() for channel in image]
        hidden = [max(0.0, sum(w * a for w, a in zip(row, means)) + b) for row, b in zip(W1, b1)]
        gates.append([1 / (1 + math.exp(-(sum(w * h for w, h in zip(row, hidden)) + b))) for row, b in zip(W2, b2)])
    return torch.tensor(gates, dtype=x.dtype)[:, :, None, None]


def test_squeeze_excite_is_its_definition():
    for channels in (8, 64, 65, 128, 512):      # hidden units max(C // 16, 4)
        first = [m for m in SqueezeExcite(channels).modules() if isinstance(m, nn.Linear)][0]
        assert (first.in_features, first.out_features) == (channels, max(channels // 16, 4))
    se = SqueezeExcite(64).double()
    scales = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64).view(3, 1, 1, 1)      # gates far from 1/2 too
    x = torch.randn(3, 64, 5, 5, generator=generator(19), dtype=torch.float64) * scales
    torch.testing.assert_close(se(x), x * gates_in_sums(se, x), rtol=1e-10, atol=1e-13)


def swish(u): return u * torch.sigmoid(u)


def bn_in_evaluation(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    return (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + BN_EPS) * \
        bn.weight[:, None, None] + bn.bias[:, None, None]


def cell_by_definition(kind: str, cell: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """NVAE's cell of this kind (the official `Cell` and `neural_operations.py`), in evaluation mode, from the
    cell's tensors: F.conv2d with weight-normalised kernels where NVAE normalises, batch norm as its affine map."""
    resample, place = kind.split('_')
    norms = [m for m in cell.branch.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in cell.branch.modules() if isinstance(m, nn.Conv2d)]
    if place in ('pre', 'enc'):           # two res_bnswish: BN, Swish, 3x3 conv (weight-normalised, bias)
        stride = 2 if resample == 'down' else 1
        h = F.conv2d(swish(bn_in_evaluation(norms[0], x)), applied_kernel(convs[0]), convs[0].bias, stride, 1)
        h = F.conv2d(swish(bn_in_evaluation(norms[1], h)), applied_kernel(convs[1]), convs[1].bias, 1, 1)
        if resample == 'down':            # factorised reduce: Swish, four 1x1 stride-2 convs on shifted inputs
            s = swish(x)
            reduce = [m for m in cell.skip.modules() if isinstance(m, nn.Conv2d)]
            shifted = (s, s[:, :, 1:, 1:], s[:, :, :, 1:], s[:, :, 1:, :])
            skip = torch.cat([F.conv2d(t, applied_kernel(c), c.bias, 2) for t, c in zip(shifted, reduce)], 1)
        else: skip = x
    else:                                 # inverted residual: no bias, no weight norm
        hidden = convs[0].out_channels
        h = F.interpolate(x, scale_factor=2, mode='nearest') if resample == 'up' else x
        h = F.conv2d(bn_in_evaluation(norms[0], h), convs[0].weight)
        h = F.conv2d(swish(bn_in_evaluation(norms[1], h)), convs[1].weight, padding=2, groups=hidden)
        h = bn_in_evaluation(norms[3], F.conv2d(swish(bn_in_evaluation(norms[2], h)), convs[2].weight))
        if resample == 'up':              # bilinear x2 with corners aligned, then a weight-normalised 1x1, no bias
            (up,) = [m for m in cell.skip.modules() if isinstance(m, nn.Conv2d)]
            skip = F.conv2d(F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=True), applied_kernel(up))
        else: skip = x
    return skip + RESIDUAL_SCALE * h * gates_in_sums(cell.squeeze_excite, h)


@pytest.mark.parametrize('kind', CELL_KINDS)
def test_every_cell_kind_is_its_definition(kind):
    torch.manual_seed(20)
    cell = make_cell(kind, 16).double().eval()
    with torch.no_grad():                 # every statistic, scale, shift and length away from its start
        for m in cell.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(); m.running_var.uniform_(0.5, 2); m.weight.uniform_(0.5, 2); m.bias.normal_()
            if hasattr(m, 'log_weight_norm'): m.log_weight_norm.add_(0.3 * torch.randn_like(m.log_weight_norm))
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    with torch.no_grad(): got, expected = cell(x), cell_by_definition(kind, cell, x)
    size = {'down': 4, 'up': 16}.get(kind.split('_')[0], 8)
    channels = {'down': 32, 'up': 8}.get(kind.split('_')[0], 16)
    assert got.shape == (2, channels, size, size)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def nvae_cell_parameters(kind: str, c: int) -> int:
    """The parameters of NVAE's `Cell` of this kind (architecture res_mbconv, with SE), counted layer by layer as the
    official code defines them: `Conv2D` holds a weight, a bias if asked and, when weight-normalised, one length per
    output channel; a batch norm a scale and a shift per channel; `SE(C)` two linears through max(C // 16, 4)."""
    def conv(c_in, c_out, k, bias, weight_norm, groups=1):
        return c_out * (c_in // groups) * k * k + (c_out if bias else 0) + (c_out if weight_norm else 0)
    def bn(channels): return 2 * channels
    resample, place = kind.split('_')
    layers = []
    if place in ('pre', 'enc'):                        # res_bnswish twice; the first halves the size when down
        c_out = 2 * c if resample == 'down' else c
        if resample == 'down':                         # FactorizedReduce(c, 2c): four 1x1 convs, with bias
            quarter = c_out // 4
            layers += [conv(c, width, 1, True, True) for width in (quarter, quarter, quarter, c_out - 3 * quarter)]
        layers += [bn(c), conv(c, c_out, 3, True, True), bn(c_out), conv(c_out, c_out, 3, True, True)]
    else:                                              # InvertedResidual, expansion 6 (dec) or 3 (post), kernel 5
        c_out = c // 2 if resample == 'up' else c
        hidden = (6 if place == 'dec' else 3) * c
        if resample == 'up': layers.append(conv(c, c_out, 1, False, True))    # UpSample, then Conv2D's defaults
        layers += [bn(c), conv(c, hidden, 1, False, False), bn(hidden),
                   conv(hidden, hidden, 5, False, False, groups=hidden), bn(hidden),
                   conv(hidden, c_out, 1, False, False), bn(c_out)]
    se_hidden = max(c_out // 16, 4)
    layers += [c_out * se_hidden + se_hidden, se_hidden * c_out + c_out]
    return sum(layers)


@pytest.mark.parametrize('kind', CELL_KINDS)
def test_every_cell_kind_holds_nvaes_parameter_count(kind):
    for channels in (8, 20, 32, 64, 128):
        expected = nvae_cell_parameters(kind, channels)
        assert sum(p.numel() for p in make_cell(kind, channels).parameters()) == expected, channels
        assert sum(math.prod(shape) for _, shape in official_cell_parameters(kind, channels)) == expected, channels
