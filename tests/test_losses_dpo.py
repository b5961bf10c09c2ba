"""The DPO losses: each at a point worked out by hand, and each TRL also has against TRL's formula written out here
(after huggingface/trl f2cd577 ``DPOTrainer._compute_loss``) on the same random inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from abel_lightning.losses.dpo import DPO_LOSSES, BCOLoss, DPOLoss, PairLogps, WeightedLoss

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def one_pair(reference: bool = True) -> PairLogps:
    # pc = -1, pr = -3, rc = rr = -2: c = pc - rc = 1, r = pr - rr = -1, h = c - r = 2; nc = 2, nr = 4 tokens.
    ref = (t([-2.0]), t([-2.0])) if reference else (None, None)
    return PairLogps(t([-1.0]), t([-3.0]), t([2.0]), t([4.0]), *ref)


def two_pairs() -> PairLogps:
    # pc - pr = [2, -2], rc - rr = [0, 2]; c = [1, -3], r = [-1, 1]; h = [2, -4].
    return PairLogps(t([-1.0, -4.0]), t([-3.0, -2.0]), t([2.0, 2.0]), t([4.0, 2.0]), t([-2.0, -1.0]), t([-2.0, -3.0]))


# With beta = 0.5 on one_pair: beta h = 1, beta c = 0.5, beta r = -0.5.
HAND = [
    # -log sigmoid(1) = softplus(-1) = 0.3132617
    ("sigmoid", {"beta": 0.5}, one_pair, [0.3132617]),
    # 0.9 * 0.3132617 + 0.1 * softplus(1) = 0.2819355 + 0.1313262 = 0.4132617
    ("sigmoid", {"beta": 0.5, "label_smoothing": 0.1}, one_pair, [0.4132617]),
    ("cdpo", {"beta": 0.5, "label_smoothing": 0.1}, one_pair, [0.4132617]),
    # (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 = (0.2819355 - 0.1313262) / 0.8 = 0.1882617
    ("robust", {"beta": 0.5, "label_smoothing": 0.1}, one_pair, [0.1882617]),
    # relu(1 - 0.25 * 2) = 0.5; relu(1 - 1 * 2) = 0
    ("hinge", {"beta": 0.25}, one_pair, [0.5]),
    ("hinge", {"beta": 1.0}, one_pair, [0.0]),
    # (h - 1/(2 beta))^2 = (2 - 1)^2 = 1; beta 1: (2 - 0.5)^2 = 2.25
    ("ipo", {"beta": 0.5}, one_pair, [1.0]),
    ("ipo", {"beta": 1.0}, one_pair, [2.25]),
    # c/nc - r/nr = 1/2 + 1/4 = 0.75; (0.75 - 1)^2 = 0.0625
    ("ipo_norm", {"beta": 0.5}, one_pair, [0.0625]),
    # softplus(-0.5 * 0.75) = softplus(-0.375) = 0.5231233
    ("sigmoid_norm", {"beta": 0.5}, one_pair, [0.5231233]),
    # q = sigmoid(1) = 0.7310586: q (log q - log 0.999) + (1 - q)(log(1 - q) - log 0.001)
    #   = 0.7310586 (-0.3132617 + 0.0010005) + 0.2689414 (-1.3132617 + 6.9077553) = -0.2282781 + 1.5045879 = 1.2763098
    ("exo_pair", {"beta": 0.5}, one_pair, [1.2763098]),
    # softplus(-0.5) + 0.5 softplus(0.5) + 0.5 softplus(-0.5) = 1.5 * 0.4740770 + 0.5 * 0.9740770 = 1.1981540
    ("nca_pair", {"beta": 0.5}, one_pair, [1.1981540]),
    # first batch: delta = mean(0.5, -0.5) = 0; softplus(-0.5) + softplus(-0.5) = 0.9481540
    ("bco_pair", {"beta": 0.5}, one_pair, [0.9481540]),
    # beta 1: (c - 0.5)^2 + (r + 0.5)^2 = 0.25 + 0.25 = 0.5
    ("sppo_hard", {"beta": 1.0}, one_pair, [0.5]),
    # sort(pc - pr) = [-2, 2], sort(rc - rr) = [0, 2]: beta delta = [-1, 0] -> [softplus(1), log 2]
    ("aot", {"beta": 0.5}, two_pairs, [1.3132617, 0.6931472]),
    # sort(c) = [-3, 1], sort(r) = [-1, 1]: beta delta = [-1, 0]; the unsorted DPO loss would be [0.313, 2.127]
    ("aot_unpaired", {"beta": 0.5}, two_pairs, [1.3132617, 0.6931472]),
    # 1 - sigmoid(0.5) + sigmoid(-0.5) = 1 - 0.6224593 + 0.3775407 = 0.7550814
    ("apo_zero", {"beta": 0.5}, one_pair, [0.7550813]),
    # sigmoid(0.5) + 1 - sigmoid(1) = 0.6224593 + 1 - 0.7310586 = 0.8914008
    ("apo_down", {"beta": 0.5}, one_pair, [0.8914008]),
    # tau 1: m = sigmoid(1) = 0.7310586; (1 - m) softplus(-1) + m e^-1 = 0.0842491 + 0.2689414 = 0.3531905
    ("discopop", {"beta": 0.5, "tau": 1.0}, one_pair, [0.3531905]),
    # -(pc_1 + pc_2) / (nc_1 + nc_2) = 5 / 4 on both rows
    ("sft", {}, two_pairs, [1.25, 1.25]),
    # beta pc/nc - beta pr/nr - gamma = 2 (-0.5) - 2 (-0.75) - 1 = -0.5; softplus(0.5) = 0.9740770
    ("simpo", {"beta": 2.0, "gamma": 1.0}, lambda: one_pair(reference=False), [0.9740770]),
    # a = -0.5, b = -0.75; o(a) - o(b) = 0.25 - (log(1 - e^-0.5) - log(1 - e^-0.75)) = 0.25 + 0.2933987 = 0.5433987;
    # 0.5 + 0.5 softplus(-0.5433987) = 0.5 + 0.5 * 0.4579127 = 0.7289564
    ("orpo", {"beta": 0.5}, lambda: one_pair(reference=False), [0.7289564]),
    # sigmoid + 1 * (-pc / nc) = 0.3132617 + 0.5
    ("rpo", {"preference": DPO_LOSSES.get("sigmoid")(beta=0.5), "alpha": 1.0}, one_pair, [0.8132617]),
    # 1 * sigmoid + 0.5 * sft = 0.3132617 + 0.5 * 0.5
    (
        "weighted",
        {"losses": [DPO_LOSSES.get("sigmoid")(beta=0.5), "sft"], "weights": [1.0, 0.5]},
        one_pair,
        [0.5632617],
    ),
]


def test_the_catalogue_is_complete():
    trl = {
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
        "sigmoid_norm",
    }
    ours = {"simpo", "cdpo", "ipo_norm", "rpo", "orpo", "weighted"}
    assert set(DPO_LOSSES.names()) == trl | ours
    assert {name for name, *_ in HAND} == trl | ours  # every loss has a hand-worked point


@pytest.mark.parametrize(
    ("name", "settings", "inputs", "expected"), HAND, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND)]
)
def test_each_loss_at_a_hand_computed_point(name, settings, inputs, expected):
    output = DPO_LOSSES.get(name)(**settings)(inputs())
    assert_close(output.losses, t(expected), atol=1e-6, rtol=0)
    assert_close(output.loss, t(expected).mean(), atol=1e-6, rtol=0)


def test_hand_values_behind_the_table():
    assert softplus(-1.0) == pytest.approx(0.3132617) and softplus(-0.375) == pytest.approx(0.5231233)
    assert softplus(-0.5) == pytest.approx(0.4740770) and softplus(0.5) == pytest.approx(0.9740770)
    assert softplus(-0.25) + softplus(0.25) == pytest.approx(1.4018788)
    q = sigmoid(1.0)
    assert q * (math.log(q) - math.log(0.999)) + (1 - q) * (math.log(1 - q) - math.log(1e-3)) == pytest.approx(
        1.2763098
    )
    log_odds = 0.25 - (math.log1p(-math.exp(-0.5)) - math.log1p(-math.exp(-0.75)))
    assert log_odds == pytest.approx(0.5433987) and 0.5 + 0.5 * softplus(-log_odds) == pytest.approx(0.7289564)


def test_the_seed_default_is_plain_dpo_at_beta_0_1():
    loss = DPO_LOSSES.resolve("sigmoid")
    assert (loss.beta, loss.label_smoothing) == (0.1, 0.0)
    logps = t([-5.0, -7.0])
    # h = 0 -> -log sigmoid(0) = log 2 for every pair.
    output = loss(PairLogps(logps, logps + 1.0, t([3.0, 3.0]), t([3.0, 3.0]), logps, logps + 1.0))
    assert_close(output.loss, t(math.log(2.0)))


def test_rewards_are_beta_times_log_ratios_and_detached():
    output = DPO_LOSSES.get("sigmoid")(beta=0.5)(one_pair())
    # chosen: 0.5 * (-1 - -2) = 0.5; rejected: 0.5 * (-3 - -2) = -0.5.
    assert_close(output.chosen_rewards, t([0.5]))
    assert_close(output.rejected_rewards, t([-0.5]))
    assert not output.chosen_rewards.requires_grad


def test_reference_free_losses_report_length_normalised_rewards():
    output = DPO_LOSSES.get("simpo")(beta=2.0)(one_pair(reference=False))
    # 2 * (-1 / 2) = -1; 2 * (-3 / 4) = -1.5.
    assert_close(output.chosen_rewards, t([-1.0]))
    assert_close(output.rejected_rewards, t([-1.5]))


def test_gradient_flows_to_the_policy_only():
    policy_chosen = t([-4.0]).requires_grad_()
    policy_rejected = t([-6.0]).requires_grad_()
    x = PairLogps(policy_chosen, policy_rejected, t([1.0]), t([1.0]), t([-4.0]), t([-6.0]))
    DPO_LOSSES.resolve("sigmoid")(x).loss.backward()
    # d/dpc [-log sigmoid(beta * h)] = -beta * sigmoid(-beta * h) = -0.1 * 0.5 at h = 0; the rejected side is +0.05.
    assert_close(policy_chosen.grad, t([-0.05]))
    assert_close(policy_rejected.grad, t([0.05]))


def test_which_losses_need_the_reference():
    # `weighted` has no default parts; it is checked on two combinations below.
    free = {name for name in DPO_LOSSES if name != "weighted" and not DPO_LOSSES.resolve(name).uses_reference}
    assert free == {"sft", "simpo", "orpo"}
    assert not WeightedLoss(["simpo", "sft"]).uses_reference and WeightedLoss(["simpo", "sigmoid"]).uses_reference
    with pytest.raises(ValueError, match="uses_reference = True"):
        DPO_LOSSES.resolve("sigmoid")(one_pair(reference=False))


def test_settings_outside_a_loss_domain_are_refused():
    with pytest.raises(ValueError, match="0.5"):
        DPO_LOSSES.get("robust")(label_smoothing=0.5)
    with pytest.raises(ValueError, match="0 is plain `sigmoid`"):
        DPO_LOSSES.get("cdpo")(label_smoothing=0.0)
    with pytest.raises(ValueError, match="exo_pair needs 0 < label_smoothing"):
        DPO_LOSSES.get("exo_pair")(label_smoothing=0.0)
    with pytest.raises(ValueError, match="2 weights for 1 losses"):
        WeightedLoss(["sigmoid"], [1.0, 2.0])


def test_unknown_loss_lists_the_registered_names():
    with pytest.raises(ValueError, match="'aot', 'aot_unpaired'.*class_path"):
        DPO_LOSSES.resolve("kto")


def test_bco_reward_shift_is_the_running_mean_of_training_batches_only():
    loss = BCOLoss(beta=0.5)
    loss(one_pair())  # batch mean reward (0.5 - 0.5) / 2 = 0
    # c = r = 1: rewards 0.5, 0.5, mean 0.5; delta = (0 + 0.5) / 2 = 0.25:
    # softplus(-(0.5 - 0.25)) + softplus(0.5 - 0.25) = 0.5759394 + 0.8259394 = 1.4018788
    same = PairLogps(t([-1.0]), t([-1.0]), t([1.0]), t([1.0]), t([-2.0]), t([-2.0]))
    # Validation reads the shift (0 so far) without moving it: softplus(-0.5) + softplus(0.5) = 1.4481540.
    with torch.no_grad():
        assert_close(loss(same).loss, t(1.4481540), atol=1e-6, rtol=0)
    assert_close(loss(same).loss, t(1.4018788), atol=1e-6, rtol=0)
    assert_close(BCOLoss(beta=0.5, running_shift=False)(same).loss, t(1.4481540), atol=1e-6, rtol=0)


def test_a_subclass_is_a_loss_without_registering():
    class Exponential(DPOLoss):
        def pair_losses(self, x):
            return torch.exp(-self.beta * x.margin)

    # exp(-0.5 * 2) = e^-1
    assert_close(DPO_LOSSES.resolve(Exponential(beta=0.5))(one_pair()).loss, t(math.exp(-1.0)))


# -- against TRL's formulas ------------------------------------------------------------------------------------


def random_batch(b: int = 5, t_len: int = 6, vocab: int = 11):
    """Random logits of 2B rows (chosen, then rejected), as TRL's ``_compute_loss`` sees them, and the same
    quantities as our ``PairLogps``: per-token log-probs summed over the completion mask."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * b, t_len, vocab, generator=generator, dtype=F64)
    labels = torch.randint(vocab, (2 * b, t_len), generator=generator)
    lengths = torch.randint(1, t_len + 1, (2 * b,), generator=generator)
    mask = (torch.arange(t_len) < lengths[:, None]).to(F64)
    per_token = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1) * mask
    ref = per_token.sum(1) + torch.randn(2 * b, generator=generator, dtype=F64)
    policy = per_token.sum(1)
    (pc, pr), (rc, rr), (nc, nr) = policy.chunk(2), ref.chunk(2), mask.sum(1).chunk(2)
    return PairLogps(pc, pr, nc, nr, rc, rr), (logits, labels, mask)


def trl_losses(loss_type: str, x: PairLogps, tensors, beta: float, label_smoothing: float, tau: float = 0.05):
    """TRL's per-sequence losses, transcribed from its formulas (reverse-KL f-divergence, no WPO weighting)."""
    pc, pr, rc, rr = x.policy_chosen, x.policy_rejected, x.reference_chosen, x.reference_rejected
    cs, rs = pc - rc, pr - rr  # TRL: chosen_scores, rejected_scores
    d = cs - rs
    nc, nr = x.chosen_tokens.clamp(min=1.0), x.rejected_tokens.clamp(min=1.0)
    ls, ms = F.logsigmoid, torch.sigmoid
    if loss_type == "sigmoid":
        return -ls(beta * d)
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "ipo":
        return (cs / nc - rs / nr - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        eps = torch.tensor(label_smoothing, dtype=F64)
        return ms(beta * d) * (ls(beta * d) - torch.log1p(-eps)) + ms(-beta * d) * (ls(-beta * d) - torch.log(eps))
    if loss_type == "nca_pair":
        return -ls(beta * cs) - 0.5 * ls(-beta * cs) - 0.5 * ls(-beta * rs)
    if loss_type == "robust":
        return (-(1 - label_smoothing) * ls(beta * d) + label_smoothing * ls(-beta * d)) / (1 - 2 * label_smoothing)
    if loss_type == "bco_pair":
        return -ls(beta * cs) - ls(-beta * rs)
    if loss_type == "sppo_hard":
        return (cs - 0.5 / beta) ** 2 + (rs + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            delta = torch.sort(pc - pr, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]
        else:
            delta = torch.sort(cs, dim=0)[0] - torch.sort(rs, dim=0)[0]
        return -ls(beta * delta) * (1 - label_smoothing) - ls(-beta * delta) * label_smoothing
    if loss_type == "apo_zero":
        return 1 - ms(beta * cs) + ms(beta * rs)
    if loss_type == "apo_down":
        return ms(beta * cs) + 1 - ms(beta * d)
    if loss_type == "discopop":
        z = beta * d
        m = ms(z / tau)
        return -ls(z) * (1 - m) + torch.exp(-z) * m
    if loss_type == "sft":
        logits, labels, mask = tensors
        (chosen_logits, _), (chosen_labels, _), (chosen_mask, _) = logits.chunk(2), labels.chunk(2), mask.chunk(2)
        keep = chosen_mask.bool()
        return F.cross_entropy(chosen_logits[keep], chosen_labels[keep]).expand(chosen_logits.size(0))
    if loss_type == "sigmoid_norm":
        return -ls(beta * (cs / nc - rs / nr))
    raise AssertionError(loss_type)


# Ours -> (TRL's loss_type, our settings). Where the name differs the convention does: our `ipo` sums over tokens
# (the paper's h), TRL's averages first, which is our `ipo_norm`; our `bco_pair` keeps the paper's running reward
# shift, TRL's current one has none (running_shift: false; the running mean is tested above).
AGAINST_TRL = {
    "sigmoid": ("sigmoid", {}),
    "hinge": ("hinge", {}),
    "ipo_norm": ("ipo", {}),
    "exo_pair": ("exo_pair", {"label_smoothing": 1e-3}),
    "nca_pair": ("nca_pair", {}),
    "robust": ("robust", {"label_smoothing": 0.2}),
    "bco_pair": ("bco_pair", {"running_shift": False}),
    "sppo_hard": ("sppo_hard", {}),
    "aot": ("aot", {"label_smoothing": 0.1}),
    "aot_unpaired": ("aot_unpaired", {"label_smoothing": 0.1}),
    "apo_zero": ("apo_zero", {}),
    "apo_down": ("apo_down", {}),
    "discopop": ("discopop", {"tau": 0.05}),
    "sft": ("sft", {}),
    "sigmoid_norm": ("sigmoid_norm", {}),
}


@pytest.mark.parametrize("ours", sorted(AGAINST_TRL))
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_matches_trl_on_random_inputs(ours, beta):
    trl_type, settings = AGAINST_TRL[ours]
    x, tensors = random_batch()
    if ours != "sft":  # the one without a beta
        settings = {"beta": beta, **settings}
    expected = trl_losses(trl_type, x, tensors, beta, settings.get("label_smoothing", 0.0), settings.get("tau", 0.05))
    assert_close(DPO_LOSSES.get(ours)(**settings)(x).losses, expected)


def test_our_ipo_is_trls_formula_on_whole_sequence_log_probs():
    """The one deliberate difference: TRL's IPO with every response counted as one token is ours."""
    x, tensors = random_batch()
    ones = torch.ones_like(x.chosen_tokens)
    summed = PairLogps(x.policy_chosen, x.policy_rejected, ones, ones, x.reference_chosen, x.reference_rejected)
    assert_close(DPO_LOSSES.get("ipo")(beta=0.3)(x).losses, trl_losses("ipo", summed, tensors, 0.3, 0.0))
    assert not torch.allclose(DPO_LOSSES.get("ipo")(beta=0.3)(x).losses, trl_losses("ipo", x, tensors, 0.3, 0.0))


def test_trls_rpo_alpha_is_weighted_sigmoid_and_sft():
    """TRL's ``rpo_alpha``: ``sigmoid + alpha * NLL`` with the NLL averaged over the batch's chosen tokens."""
    x, tensors = random_batch()
    expected = (trl_losses("sigmoid", x, tensors, 0.1, 0.0) + 0.5 * trl_losses("sft", x, tensors, 0.1, 0.0)).mean()
    assert_close(WeightedLoss(["sigmoid", "sft"], [1.0, 0.5])(x).loss, expected)
