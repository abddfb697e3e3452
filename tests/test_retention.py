"""Retention policies: the guide's timelines and the invariants every strategy keeps."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptwriter import ConfigError
from ckptwriter.retention import (
    DEFAULT_TOP_K,
    CheckpointRecord,
    KeepTopKByScore,
    make_policy,
    select_for_deletion,
)


def _simulate(strategy: str, keep: int, episodes: list[int],
              scores: dict[int, float] | None = None) -> list[tuple[int, list[str]]]:
    policy = make_policy(strategy, keep)
    kept: list[CheckpointRecord] = []
    timeline = []
    for ep in episodes:
        kept.append(CheckpointRecord(f"ep_{ep:06d}", ep, (scores or {}).get(ep)))
        doomed = select_for_deletion(kept, policy)
        kept = [r for r in kept if r.name not in doomed]
        timeline.append((ep, doomed))
    return timeline


def test_last_n_guide_timeline() -> None:
    """keep 5, every 50 episodes: deletions exactly as the guide's timeline shows."""
    timeline = _simulate("last_n", 5, [50, 100, 150, 200, 250, 300, 350])
    assert timeline == [
        (50, []), (100, []), (150, []), (200, []), (250, []),
        (300, ["ep_000050"]), (350, ["ep_000100"]),
    ]


def test_top_k_val_guide_timeline() -> None:
    """K=3 with the guide's scores: deletions and final set exactly as the guide shows."""
    scores = {50: 0.45, 100: 0.52, 150: 0.48, 200: 0.55, 250: 0.51}
    timeline = _simulate("top_k_val", 3, list(scores), scores)
    assert timeline == [
        (50, []), (100, []), (150, []), (200, ["ep_000050"]), (250, ["ep_000150"]),
    ]


@pytest.mark.parametrize(
    ("strategy", "keep", "message"),
    [
        pytest.param(None, 0, r"^checkpoint_keep_last must be > 0, got 0", id="zero"),
        pytest.param("last_n", -1, r"^checkpoint_keep_last must be > 0", id="negative"),
        pytest.param("last_n", None, r"^checkpoint_strategy last_n needs checkpoint_keep_last",
                     id="last-n-without-keep"),
        pytest.param("best", 3, r"^unknown checkpoint_strategy 'best'", id="unknown"),
        pytest.param("all", 5, r"^checkpoint_strategy all keeps every checkpoint",
                     id="all-with-keep"),
    ],
)
def test_invalid_settings_are_config_errors(strategy: str | None, keep: int | None,
                                            message: str) -> None:
    """Invalid strategy/keep combinations name the fix."""
    with pytest.raises(ConfigError, match=message):
        make_policy(strategy, keep)


def test_defaults_follow_keep_last() -> None:
    """No keep_last keeps all; keep_last alone means last_n."""
    assert type(make_policy(None, None)).__name__ == "KeepAll"
    assert type(make_policy(None, 5)).__name__ == "KeepLastN"


def test_top_k_val_without_keep_last_keeps_the_default_k() -> None:
    """top_k_val without keep_last keeps DEFAULT_TOP_K (3), as the YAML always has."""
    assert make_policy("top_k_val", None) == KeepTopKByScore(DEFAULT_TOP_K)
    assert DEFAULT_TOP_K == 3


records = st.lists(
    st.tuples(st.integers(0, 10_000), st.one_of(st.none(), st.floats(0, 1))),
    min_size=1, max_size=30, unique_by=lambda t: t[0],
).map(lambda xs: [CheckpointRecord(f"ep_{e:06d}", e, s) for e, s in xs])
strategies = st.sampled_from(["all", "last_n", "top_k_val"])


@given(records, strategies, st.integers(1, 10))
def test_latest_is_never_deleted(recs: list[CheckpointRecord], strategy: str, keep: int) -> None:
    """Whatever the strategy, the newest checkpoint survives."""
    doomed = select_for_deletion(recs, make_policy(strategy, None if strategy == "all" else keep))
    newest = max(recs, key=lambda r: r.episode_index)
    assert newest.name not in doomed


@given(records, strategies, st.integers(1, 10), st.data())
def test_protected_are_never_deleted(recs: list[CheckpointRecord], strategy: str, keep: int,
                                     data: st.DataObject) -> None:
    """Protected checkpoints (being written or resumed from) are never deleted."""
    protected = data.draw(st.sets(st.sampled_from([r.name for r in recs])))
    doomed = select_for_deletion(
        recs, make_policy(strategy, None if strategy == "all" else keep), protected=protected
    )
    assert not protected & set(doomed)


@given(records, st.integers(1, 10))
def test_last_n_keeps_exactly_n_newest(recs: list[CheckpointRecord], keep: int) -> None:
    """last_n keeps min(n, count) checkpoints, the newest ones."""
    doomed = set(select_for_deletion(recs, make_policy("last_n", keep)))
    kept = sorted(r.episode_index for r in recs if r.name not in doomed)
    assert kept == sorted(r.episode_index for r in recs)[-keep:]


@given(records, st.integers(1, 10))
def test_top_k_keeps_best_scores_and_latest(recs: list[CheckpointRecord], keep: int) -> None:
    """top_k_val keeps the K best (unscored rank last, ties to newer) plus the latest."""
    doomed = set(select_for_deletion(recs, make_policy("top_k_val", keep)))
    kept = [r for r in recs if r.name not in doomed]
    newest = max(recs, key=lambda r: r.episode_index)
    assert len(kept) <= keep + 1
    assert len(kept) >= min(keep, len(recs))
    others = [r for r in kept if r is not newest]
    for d in (r for r in recs if r.name in doomed):
        for k in others:
            # no deleted checkpoint outranks a kept one
            dk = (d.val_score is not None, d.val_score or 0.0, d.episode_index)
            kk = (k.val_score is not None, k.val_score or 0.0, k.episode_index)
            assert dk < kk


@given(records)
def test_all_deletes_nothing(recs: list[CheckpointRecord]) -> None:
    """The default strategy never deletes."""
    assert select_for_deletion(recs, make_policy(None, None)) == []


def test_top_k_val_min_mode_keeps_the_lowest_scores() -> None:
    """mode="min": a loss; the K lowest scores are the best, unscored still rank last."""
    policy = make_policy("top_k_val", 2, mode="min")
    recs = [CheckpointRecord(f"ep_{e:06d}", e, s)
            for e, s in [(1, 0.9), (2, 0.1), (3, None), (4, 0.5), (5, 0.3), (6, 0.7)]]
    assert select_for_deletion(recs, policy) == ["ep_000001", "ep_000003", "ep_000004"]
    # The same scores in max mode keep the highest.
    assert select_for_deletion(recs, make_policy("top_k_val", 2)) == [
        "ep_000002", "ep_000003", "ep_000004", "ep_000005"]


@given(st.lists(st.integers(1, 300), min_size=1, max_size=40, unique=True),
       st.sampled_from(["last_n", "top_k_val"]), st.integers(1, 4), st.integers(1, 50))
def test_keep_every_never_deletes_a_milestone(eps: list[int], strategy: str, keep: int,
                                              every: int) -> None:
    """keep_every N: an episode that is a multiple of N survives every strategy."""
    policy = make_policy(strategy, keep, keep_every=every)
    recs = [CheckpointRecord(f"ep_{e:06d}", e, float(e % 7)) for e in sorted(eps)]
    doomed = select_for_deletion(recs, policy)
    assert not [n for n in doomed if int(n[3:]) % every == 0]
    # Besides milestones it deletes exactly what the strategy alone deletes.
    plain = select_for_deletion(recs, make_policy(strategy, keep))
    assert doomed == [n for n in plain if int(n[3:]) % every != 0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"mode": "maximum"}, r"^checkpoint_mode must be 'max' or 'min', got "
                     "'maximum'", id="mode"),
        pytest.param({"keep_every": 0}, r"^checkpoint_keep_every must be an int > 0, got 0",
                     id="keep-every-zero"),
        pytest.param({"keep_every": True}, r"^checkpoint_keep_every must be an int > 0",
                     id="keep-every-bool"),
    ],
)
def test_mode_and_keep_every_are_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_policy("last_n", 3, **kwargs)  # type: ignore[arg-type]
