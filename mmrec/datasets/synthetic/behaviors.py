"""Behaviors drawn from the true preference: views, the view => cart => buy cascade, exposures.

Views are a Gumbel-top-k draw (sampling without replacement from
``softmax_i(score(u, i, s))``) per scenario, computed in user blocks so the
medium world never holds a dense users x items float64 matrix. Cart and buy
keep the views whose noisy utility is highest, so buys are the best-liked of
what a user saw, and the cascade holds by construction (unless ``direct_buy_share``
drops the logged view and cart of some buys).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmrec.datasets.schema import Interactions
from mmrec.datasets.synthetic.config import WorldConfig
from mmrec.datasets.synthetic.factors import ATTRIBUTES, Factors, TrueAffinity, stream

BEHAVIORS = ["view", "cart", "buy"]
TARGET = "buy"
_DAY = 86_400
_MIN_GAP = 2 * 3_600  # seconds between two views of a user: larger than view->cart->buy delays
_MAX_DELAY = 1_800  # view -> cart and cart -> buy delays are below this
_MIN_EXP = np.float32(2.0**-24)  # float32 resolution of the exponential draws


@dataclass
class Views:
    user: np.ndarray
    item: np.ndarray
    scenario: np.ndarray
    score: np.ndarray  # true score of the row in its scenario


def sample_views(aff: TrueAffinity, factors: Factors, cfg: WorldConfig, seed: int) -> Views:
    """Each user views ``min_views + Poisson(mean_views * activity)`` distinct items."""
    rng = stream(seed, "views")
    n_users, n_items, n_scen = aff.n_users, aff.n_items, cfg.n_scenarios
    sigma = cfg.activity_skew
    activity = rng.lognormal(-0.5 * sigma**2, sigma, n_users)
    n_views = cfg.min_views + rng.poisson(cfg.mean_views * activity)
    n_views = np.minimum(n_views, max(1, n_items // 2))
    counts = rng.multinomial(n_views, factors.scenario_mix)  # [n_users, n_scenarios]

    users, items, scens, scores = [], [], [], []
    block = max(1, cfg.block_users)
    for s in range(n_scen):
        for b0 in range(0, n_users, block):
            b1 = min(n_users, b0 + block)
            k = counts[b0:b1, s]
            kmax = int(k.max())
            if kmax == 0:
                continue
            sc = aff(slice(b0, b1), scenario=s)
            g = rng.standard_exponential(sc.shape, dtype=np.float32)
            np.maximum(g, _MIN_EXP, out=g)  # a float32 draw of exactly 0 would be an infinite Gumbel
            np.log(g, out=g)
            np.subtract(sc, g, out=g)  # score + Gumbel noise, in place (blocks are large)
            top = np.argpartition(g, n_items - kmax, axis=1)[:, n_items - kmax:]
            order = np.argsort(-np.take_along_axis(g, top, 1), axis=1, kind="stable")
            top = np.take_along_axis(top, order, 1)
            keep = np.arange(kmax)[None, :] < k[:, None]
            rows = np.broadcast_to(np.arange(b0, b1)[:, None], top.shape)
            users.append(rows[keep])
            items.append(top[keep])
            scens.append(np.full(int(keep.sum()), s, dtype=np.int64))
            scores.append(np.take_along_axis(sc, top, 1)[keep])
    user, item = np.concatenate(users), np.concatenate(items)
    scen, score = np.concatenate(scens), np.concatenate(scores).astype(np.float32)
    # an item seen in two scenarios is one view: keep a random one of the duplicates
    perm = rng.permutation(len(user))
    _, first = np.unique(user[perm] * np.int64(n_items) + item[perm], return_index=True)
    keep = np.sort(perm[first])
    return Views(user[keep], item[keep], scen[keep], score[keep])


def _rank_within_user(user: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """0-based rank of each row among its user's rows by descending priority."""
    order = np.lexsort((-priority, user))
    u_sorted = user[order]
    starts = np.r_[0, np.flatnonzero(np.diff(u_sorted)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(u_sorted)]))
    rank = np.empty(len(user), dtype=np.int64)
    rank[order] = np.arange(len(user)) - group_start
    return rank


def cascade(views: Views, cfg: WorldConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (cart, buy) per view; buy => cart, and every user buys at least ``min_buys``."""
    rng = stream(seed, "cascade")
    n = len(views.user)
    z = (views.score - views.score.mean()) / max(float(views.score.std()), 1e-6)
    u_cart = z + cfg.cascade_noise * rng.logistic(size=n)
    cart = u_cart > np.quantile(u_cart, 1.0 - cfg.cart_rate)
    u_buy = z + cfg.cascade_noise * rng.logistic(size=n)
    buy = cart & (u_buy > np.quantile(u_buy[cart], 1.0 - cfg.buy_rate)) if cart.any() else cart.copy()
    if cfg.min_buys > 0:
        rank = _rank_within_user(views.user, np.where(buy, np.inf, u_buy))
        buy |= rank < cfg.min_buys
    cart |= buy
    return cart, buy


def timestamps(views: Views, factors: Factors, cfg: WorldConfig, seed: int) -> np.ndarray:
    """Per-user increasing view times; the order follows a per-user taste drift plus noise.

    The drift makes a user's next item resemble the previous ones (a signal for
    sequential models) without changing which items are viewed.
    """
    rng = stream(seed, "time")
    n_users = len(factors.user_latent)
    onehot = factors.onehot()
    direction = rng.standard_normal((n_users, onehot.shape[1])).astype(np.float32)
    drift = np.einsum("nk,nk->n", onehot[views.item], direction[views.user]) / np.sqrt(len(ATTRIBUTES))
    key = cfg.sequence_drift * drift + rng.standard_normal(len(drift))
    order = np.lexsort((key, views.user))
    gaps = _MIN_GAP + rng.exponential(_DAY, len(order)).astype(np.int64)
    start = cfg.time_start + rng.integers(0, 30 * _DAY, n_users)
    u_sorted = views.user[order]
    csum = np.cumsum(gaps)
    first = np.r_[0, np.flatnonzero(np.diff(u_sorted)) + 1]
    offset = np.repeat(csum[first] - gaps[first], np.diff(np.r_[first, len(order)]))
    ts = np.empty(len(order), dtype=np.int64)
    ts[order] = start[u_sorted] + csum - offset
    return ts


def direct_buys(buy: np.ndarray, cfg: WorldConfig, seed: int) -> np.ndarray:
    """Boolean per view: a buy whose view and cart were not logged (``direct_buy_share`` of the buys).

    Real logs miss the browsing behind many purchases (a search result bought at once, a
    link from outside, another device), so a test purchase is not always one the user
    was seen viewing; without this the "buy what you viewed" prior is an oracle.
    """
    if cfg.direct_buy_share <= 0:
        return np.zeros(len(buy), dtype=bool)
    return buy & (stream(seed, "direct").random(len(buy)) < cfg.direct_buy_share)


def behavior_rows(views: Views, factors: Factors, cfg: WorldConfig, seed: int) -> Interactions:
    """All view, cart and buy rows, sorted by (user, timestamp, behavior).

    The cascade holds for every buy except the :func:`direct_buys`, which have no view or
    cart row.
    """
    cart, buy = cascade(views, cfg, seed)
    direct = direct_buys(buy, cfg, seed)
    ts = timestamps(views, factors, cfg, seed)
    rng = stream(seed, "delays")
    cart_ts = ts + rng.integers(60, _MAX_DELAY, len(ts))
    buy_ts = cart_ts + rng.integers(60, _MAX_DELAY, len(ts))
    parts = [
        (~direct, 0, ts),
        (cart & ~direct, 1, cart_ts),
        (buy, 2, buy_ts),
    ]
    user = np.concatenate([views.user[m] for m, _, _ in parts])
    item = np.concatenate([views.item[m] for m, _, _ in parts])
    beh = np.concatenate([np.full(int(m.sum()), b, np.int64) for m, b, _ in parts])
    time = np.concatenate([t[m] for m, _, t in parts])
    scen = np.concatenate([views.scenario[m] for m, _, _ in parts])
    order = np.lexsort((beh, time, user))
    return Interactions(user[order], item[order], beh[order], timestamp=time[order], scenario=scen[order])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def exposures(aff: TrueAffinity, factors: Factors, cfg: WorldConfig, seed: int,
              time_range: tuple[int, int]) -> tuple[Interactions, np.ndarray, np.ndarray]:
    """Impressions with click / convert labels (ESMM: convert only after a click).

    Shown items mix popularity and uniform exposure (a recommender's log); the
    click and convert probabilities are logistic in the standardised true score.
    Returns the rows, p(click) and p(convert | click).
    """
    rng = stream(seed, "exposures")
    n_users, n_items = aff.n_users, aff.n_items
    n = n_users * cfg.exposures_per_user
    user = np.repeat(np.arange(n_users, dtype=np.int64), cfg.exposures_per_user)
    pop = np.exp(cfg.pop_weight * factors.item_bias.astype(np.float64))
    p_item = 0.5 * pop / pop.sum() + 0.5 / n_items
    item = rng.choice(n_items, size=n, p=p_item / p_item.sum())
    cum = np.cumsum(factors.scenario_mix, axis=1)
    scen = np.minimum((rng.random(n)[:, None] > cum[user]).sum(1), cfg.n_scenarios - 1).astype(np.int64)
    score = aff.pairs(user, item, scen).astype(np.float64)
    z = (score - score.mean()) / max(float(score.std()), 1e-6) if n else score
    p_click = _sigmoid(cfg.click_bias + cfg.click_slope * z)
    p_conv = _sigmoid(cfg.convert_bias + cfg.convert_slope * z)
    click = rng.random(n) < p_click
    convert = click & (rng.random(n) < p_conv)
    ts = rng.integers(time_range[0], max(time_range[1], time_range[0] + 1), n)
    order = np.lexsort((ts, user))
    target = BEHAVIORS.index(TARGET)
    rows = Interactions(user[order], item[order], np.full(n, target, np.int64), timestamp=ts[order],
                        scenario=scen[order],
                        labels={"click": click[order].astype(np.float32), "convert": convert[order].astype(np.float32)})
    return rows, p_click[order].astype(np.float32), p_conv[order].astype(np.float32)
