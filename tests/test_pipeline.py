"""jaxseg.data.pipeline: case source, sampler (uniform / weighted / hardness), patch iterator."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from jaxseg.data import store
from jaxseg.data.pipeline import CaseSampler, CaseSource, PatchBatchIterator, patch_start
from jaxseg.losses.dro import sampling_probs

# (case id, shape, channels, label?, split); some axes smaller than a 16^3 patch.
CASES = [
    ("a", (20, 18, 16), "train"),
    ("b", (24, 12, 20), "train"),
    ("c", (10, 22, 14), "train"),
    ("d", (16, 16, 24), "train"),
    ("e", (18, 20, 18), "train"),
    ("f", (14, 14, 14), "val"),
]
N_TRAIN = 5


def _arrays(i, shape):
    rng = np.random.default_rng(100 + i)
    image = rng.standard_normal((*shape, 2)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    # small foreground blobs away from the centre: a uniform 8^3 patch often misses them
    label[1:3, 1:3, 1:3] = 1
    label[-3:-1, -2:, 2:4] = 2
    return image, label


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    full = {}
    for i, (cid, shape, split) in enumerate(CASES):
        image, label = _arrays(i, shape)
        store.write_case(root, cid, image, label, {"split": split, "stratum": "control"})
        full[cid] = (image, label)
    rng = np.random.default_rng(7)
    store.write_case(root, "u", rng.standard_normal((12, 12, 12, 2)).astype(np.float32), None,
                     {"split": "train"})
    return root, full


@pytest.fixture(scope="module")
def source(store_root):
    return CaseSource(store_root[0], split="train")


def _iterator(source, sampler=None, **kw):
    if sampler is None:
        sampler = CaseSampler(len(source), seed=kw.pop("sampler_seed", 0))
    kw.setdefault("batch_size", 4)
    kw.setdefault("patch_size", 8)
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    kw.setdefault("oversample", "random")  # these tests were written for the per-sample rule
    return PatchBatchIterator(source, sampler, **kw)


def _take(it, n):
    out = [next(it) for _ in range(n)]
    return out


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _chi2(counts, probs):
    counts = np.asarray(counts, np.float64)
    expected = counts.sum() * np.asarray(probs, np.float64)
    return float(np.sum((counts - expected) ** 2 / expected))


# Upper 0.1 % points of chi-square (df: value), fixed seeds make the tests deterministic anyway.
CHI2_999 = {3: 16.27, 4: 18.47, 12: 32.91, 13: 34.53}


# ------------------------------------------------------------------------------------------
# Source
# ------------------------------------------------------------------------------------------

def test_source_filters_and_is_a_grain_source(store_root):
    root, _ = store_root
    src = CaseSource(root, split="train")
    assert src.case_ids == ["a", "b", "c", "d", "e"]  # "u" has no label, "f" is val
    assert CaseSource(root, split="val").case_ids == ["f"]
    assert CaseSource(root, split=["train", "val"]).case_ids == ["a", "b", "c", "d", "e", "f"]
    assert CaseSource(root, split="train", require_label=False).case_ids[-1] == "u"
    assert CaseSource(root, case_ids=["e", "a"]).case_ids == ["e", "a"]
    assert isinstance(src, grain.sources.RandomAccessDataSource)
    assert len(src) == 5 and src.n_channels == 2 and src[1].case_id == "b" and src[-1].case_id == "e"
    assert src[0] is src[0]  # cached
    assert src.shapes[2] == (10, 22, 14)
    assert len(grain.MapDataset.source(src)) == 5
    with pytest.raises(IndexError):
        src[5]
    with pytest.raises(ValueError, match="no case left"):
        CaseSource(root, split="nope")


# ------------------------------------------------------------------------------------------
# Sampler
# ------------------------------------------------------------------------------------------

def test_weighted_frequencies_follow_weights():
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.0])
    s = CaseSampler(5, mode="weighted", probs=p * 7, seed=3)  # normalised internally
    np.testing.assert_allclose(s.probabilities(), p)
    draws = np.concatenate([s.draw(1) for _ in range(8000)])
    counts = np.bincount(draws, minlength=5)
    assert counts[4] == 0
    assert _chi2(counts[:4], p[:4]) < CHI2_999[3]
    # weights handed each step: the next draw uses them
    s.set_probs([0, 0, 0, 0, 1])
    assert s.draw(1).tolist() == [4]


def test_hardness_frequencies_follow_softmax_of_table():
    table = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
    s = CaseSampler(5, mode="hardness", beta=1.0, seed=4)
    s.set_table(table)
    p = sampling_probs(table, 1.0, 1e-4)
    np.testing.assert_allclose(s.probabilities(), p)
    counts = np.bincount(np.concatenate([s.draw(1, step=t) for t in range(8000)]), minlength=5)
    assert _chi2(counts, p) < CHI2_999[4]


def test_uniform_is_with_replacement_and_uniform():
    s = CaseSampler(4, seed=5)
    draws = np.stack([s.draw(8, step=t) for t in range(1000)])
    assert any(len(set(d)) < 8 for d in draws)  # with replacement (B > n is allowed)
    assert _chi2(np.bincount(draws.ravel(), minlength=4), [0.25] * 4) < CHI2_999[3]


def test_update_reacts_on_the_very_next_draw():
    s = CaseSampler(8, mode="hardness", beta=100.0, seed=0)
    first = s.draw(2)
    s.update([5, 1], [10.0, 2.0])  # case 5 now far harder than all others (about 2.0)
    for _ in range(20):
        assert 5 in s.draw(2)
    s.update([5], [0.0])
    s.update([3], [9.0])
    assert 3 in s.draw(2) and 5 not in s.draw(2)
    assert first.shape == (2,)
    # non-finite losses never enter the table
    s.update([3], [float("nan")])
    assert s.stale_losses([3]).tolist() == [9.0] and s.n_nonfinite == 1


def test_update_by_case_id_and_stale_losses():
    s = CaseSampler(3, mode="hardness", case_ids=["x", "y", "z"], init_loss=2.0, init_noise=0.0)
    np.testing.assert_array_equal(s.stale_losses(["y", 2]), [2.0, 2.0])
    s.update(np.array(["y"]), [0.5])
    np.testing.assert_array_equal(s.table, [2.0, 0.5, 2.0])


def test_without_replacement_within_a_batch():
    s = CaseSampler(6, mode="hardness", beta=100.0, seed=1)
    s.update([2], [50.0])  # one case dominates: still at most once per batch
    for t in range(300):
        d = s.draw(6, step=t)
        assert sorted(d.tolist()) == list(range(6))
        d = s.draw(3, step=t)
        assert len(set(d.tolist())) == 3 and 2 in d
    with pytest.raises(ValueError, match="without replacement"):
        s.draw(7)
    w = CaseSampler(4, mode="weighted", probs=[1, 1, 0, 0])
    with pytest.raises(ValueError, match="without replacement"):
        w.draw(3)


def test_floor_is_respected():
    n, floor = 4, 1.0
    s = CaseSampler(n, mode="hardness", beta=1000.0, floor=floor, seed=2)
    s.update([0], [10.0])  # softmax alone would give the other cases ~exp(-8000)
    p = s.probabilities()
    assert p.min() >= floor / n / (1 + floor) - 1e-12
    np.testing.assert_allclose(p, np.array([1.0, 0.25, 0.25, 0.25]) / 1.75)
    counts = np.bincount(np.concatenate([s.draw(1, step=t) for t in range(6000)]), minlength=n)
    assert _chi2(counts, p) < CHI2_999[3]
    # default floor 1e-4 / n
    s2 = CaseSampler(10, mode="hardness", beta=1e4, seed=2)
    s2.update([0], [50.0])
    assert s2.probabilities().min() >= 1e-4 / 10 / (1 + 1e-4)


def test_sampler_state_roundtrip_json():
    s = CaseSampler(5, mode="hardness", seed=9)
    s.update([1, 2], [3.0, 0.1])
    s.draw(2)
    state = json.loads(json.dumps(s.state_dict()))
    s2 = CaseSampler(5, mode="hardness", seed=0)
    s2.load_state_dict(state)
    np.testing.assert_array_equal(s2.table, s.table)
    np.testing.assert_array_equal(s2.draw(3), s.draw(3))  # counter and seed restored
    with pytest.raises(ValueError, match="mode"):
        CaseSampler(5).load_state_dict(state)
    with pytest.raises(ValueError):
        CaseSampler(5, mode="uniform").set_probs([1, 1, 1, 1, 1])


# ------------------------------------------------------------------------------------------
# Patch geometry and contents
# ------------------------------------------------------------------------------------------

def _padded_slice(arr, origin, size):
    pad = 64
    widths = [(pad, pad)] * 3 + [(0, 0)] * (arr.ndim - 3)
    big = np.pad(arr, widths)
    return big[tuple(slice(o + pad, o + pad + n) for o, n in zip(origin, size))]


@pytest.mark.parametrize("live", [False, True])
def test_patch_contents_equal_numpy_slicing(store_root, source, live):
    _, full = store_root
    it = _iterator(source, patch_size=(16, 8, 12), margin=(3, 0, 2), threads=2, prefetch=2,
                   live=live, foreground_oversampling=0.5)
    region = (22, 8, 16)
    seen_pad = False
    for batch in _take(it, 6):
        assert batch["image"].shape == (4, *region, 2) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (4, *region) and batch["label"].dtype == np.int32
        assert batch["mask"].dtype == np.float32 and np.all(batch["mask"] == 1)
        assert batch["case_index"].dtype == np.int32 and batch["origin"].dtype == np.int32
        for i in range(4):
            cid = source.case_ids[batch["case_index"][i]]
            image, label = full[cid]
            o = batch["origin"][i]
            np.testing.assert_array_equal(batch["image"][i], _padded_slice(image, o, region))
            np.testing.assert_array_equal(batch["label"][i], _padded_slice(label, o, region))
            seen_pad |= bool(np.any(o < 0) or np.any(o + region > np.array(image.shape[:3])))
            # patch proper (origin + margin) fits the volume where it can, centred where it can't
            start = o + np.array([3, 0, 2])
            for a in range(3):
                n, p = image.shape[a], (16, 8, 12)[a]
                if n >= p:
                    assert 0 <= start[a] <= n - p
                else:
                    assert start[a] == -((p - n) // 2)
    assert seen_pad
    it.close()


def test_foreground_oversampling_one_always_contains_foreground(source):
    it = _iterator(source, patch_size=8, margin=2, foreground_oversampling=1.0, threads=1)
    for batch in _take(it, 15):
        assert batch["fg_forced"].all()
        core = batch["label"][:, 2:-2, 2:-2, 2:-2]
        assert np.all(core.reshape(4, -1).max(axis=1) > 0)
    it.close()


def test_foreground_oversampling_zero_centres_uniform(source):
    it = _iterator(source, patch_size=8, foreground_oversampling=0.0, threads=2)
    batches = _take(it, 10)
    assert not any(b["fg_forced"].any() for b in batches)
    # uniform over the 13 fitting starts of an axis of length 20 (case "a", axis 0)
    rng = np.random.default_rng(0)
    fg = source[0].fg
    starts = np.stack([patch_start(rng, (20, 18, 16), (8, 8, 8), fg, False)[0] for _ in range(3900)])
    assert starts[:, 0].min() == 0 and starts[:, 0].max() == 12
    assert _chi2(np.bincount(starts[:, 0], minlength=13), [1 / 13] * 13) < CHI2_999[12]
    assert starts[:, 2].max() == 8
    # forced starts: the chosen voxel is inside the patch, even against the border
    for _ in range(200):
        s, forced = patch_start(rng, (20, 18, 16), (8, 8, 8), fg, True)
        assert forced
        assert np.all(s >= 0) and np.all(s + 8 <= np.array([20, 18, 16]))


def test_oversample_last_is_nnunet_rule(source):
    it = _iterator(source, batch_size=3, foreground_oversampling=0.33, oversample="last", threads=0)
    for b in _take(it, 3):
        assert b["fg_forced"].tolist() == [False, False, True]  # round(3 * 0.67) = 2
    it = _iterator(source, batch_size=2, foreground_oversampling=0.33, oversample="last", threads=0)
    assert next(it)["fg_forced"].tolist() == [False, True]  # nnU-Net: 1 of 2 at batch 2


def test_random_oversampling_fraction(source):
    it = _iterator(source, batch_size=4, foreground_oversampling=0.33, threads=2)
    forced = np.concatenate([b["fg_forced"] for b in _take(it, 60)])
    assert 0.22 < forced.mean() < 0.45


def test_mask_fn_cropped_like_the_label(store_root, source):
    _, full = store_root
    masks = {}

    def mask_fn(case_id, shape):
        m = np.zeros(shape, np.uint8)
        m[:, :, 1::3] = 1  # "labelled" axial slices
        m[0] = 0
        masks[case_id] = m
        return m

    it = _iterator(source, patch_size=16, margin=2, mask_fn=mask_fn, threads=2, sampler_seed=3)
    for batch in _take(it, 5):
        for i in range(4):
            cid = source.case_ids[batch["case_index"][i]]
            o = batch["origin"][i]
            ref = _padded_slice(masks[cid], o, (20, 20, 20)).astype(np.float32)
            np.testing.assert_array_equal(batch["mask"][i], ref)
            inside = _padded_slice(np.ones(full[cid][1].shape, np.uint8), o, (20, 20, 20))
            assert np.all(batch["mask"][i][inside == 0] == 0)  # zeros outside the volume
            np.testing.assert_array_equal(batch["label"][i], _padded_slice(full[cid][1], o, (20, 20, 20)))
    with pytest.raises(ValueError, match="shape"):
        next(_iterator(source, mask_fn=lambda c, s: np.ones((2, 2, 2)), threads=0))


def test_unlabelled_case_gives_zero_label_and_mask(store_root):
    src = CaseSource(store_root[0], case_ids=["u"], require_label=False)
    it = _iterator(src, batch_size=2, foreground_oversampling=1.0, threads=0)
    b = next(it)
    assert not b["fg_forced"].any() and not b["label"].any() and not b["mask"].any()
    assert b["image"].any()


# ------------------------------------------------------------------------------------------
# Iterator: live weights, state, determinism, processes
# ------------------------------------------------------------------------------------------

def test_iterator_reacts_to_update_on_the_very_next_batch(source):
    sampler = CaseSampler(len(source), mode="hardness", beta=100.0, seed=0)
    it = _iterator(source, sampler, batch_size=2, threads=2, prefetch=4)
    assert it.live
    next(it)
    next(it)
    sampler.update([3], [10.0])
    for _ in range(3):
        b = next(it)
        assert 3 in b["case_index"]
        sampler.update(b["case_index"], [1.0, 1.0])  # case 3 back to easy
        sampler.update([1], [10.0])
        assert 1 in next(it)["case_index"]
        sampler.update([1], [1.0])
        sampler.update([3], [10.0])
    with pytest.raises(ValueError, match="live"):
        _iterator(source, sampler, live=False)
    it.close()


@pytest.mark.parametrize("mode", ["uniform", "hardness"])
def test_state_restore_gives_identical_following_batches(source, mode):
    def run(it, sampler, n, losses_seed):
        rng = np.random.default_rng(losses_seed)
        out = []
        for _ in range(n):
            b = next(it)
            out.append(b)
            sampler.update(b["case_index"], rng.uniform(0, 3, size=len(b["case_index"])))
        return out

    s1 = CaseSampler(len(source), mode=mode, seed=11, beta=2.0)
    it1 = _iterator(source, s1, threads=2, prefetch=3, seed=5, foreground_oversampling=0.5)
    run(it1, s1, 3, 0)
    state = json.loads(json.dumps(it1.get_state()))  # JSON-ready
    assert state["step"] == 3
    after = run(it1, s1, 4, 1)

    s2 = CaseSampler(len(source), mode=mode, seed=0, beta=2.0)
    it2 = _iterator(source, s2, threads=1, prefetch=0, seed=0, foreground_oversampling=0.5)
    next(it2)
    it2.set_state(state)
    _assert_batches_equal(run(it2, s2, 4, 1), after)
    np.testing.assert_array_equal(s2.table, s1.table)
    with pytest.raises(ValueError, match="batch size"):
        _iterator(source, CaseSampler(len(source), mode=mode, seed=0), batch_size=2).set_state(state)
    it1.close()
    it2.close()


@pytest.mark.parametrize("mode", ["uniform", "hardness"])
def test_same_seed_same_batches_whatever_the_threads(source, mode):
    results = []
    for threads, prefetch in [(0, 0), (1, 1), (3, 2), (2, 5)]:
        s = CaseSampler(len(source), mode=mode, seed=21, beta=3.0)
        it = _iterator(source, s, threads=threads, prefetch=prefetch, seed=8, margin=1,
                       foreground_oversampling=0.33)
        bs = []
        for _ in range(5):
            b = next(it)
            bs.append(b)
            s.update(b["case_index"], b["image"].mean(axis=(1, 2, 3, 4)))
        results.append(bs)
        it.close()
    for r in results[1:]:
        _assert_batches_equal(r, results[0])


def test_uniform_static_pipeline_equals_live_draws(source):
    a = _iterator(source, CaseSampler(len(source), seed=4), threads=2, prefetch=2, seed=3)
    b = _iterator(source, CaseSampler(len(source), seed=4), threads=2, live=True, seed=3)
    assert not a.live and b.live
    _assert_batches_equal(_take(a, 4), _take(b, 4))


@pytest.mark.parametrize("mode", ["uniform", "hardness"])
def test_process_slices_concatenate_to_the_global_batch(source, mode):
    def batches(pi, pc):
        s = CaseSampler(len(source), mode=mode, seed=2, beta=5.0)
        it = _iterator(source, s, batch_size=4, process_index=pi, process_count=pc, threads=2,
                       seed=6, foreground_oversampling=0.5)
        out = []
        for t in range(4):
            b = next(it)
            out.append(b)
            # every process updates with the same GLOBAL losses (here: a function of the step)
            g = it.last_global_case_index
            np.testing.assert_array_equal(g[pi * 4 // pc:(pi + 1) * 4 // pc], b["case_index"])
            s.update(g, np.arange(4, dtype=float) * (t + 1) % 3)
        it.close()
        return out

    whole = batches(0, 1)
    p0, p1 = batches(0, 2), batches(1, 2)
    for w, x, y in zip(whole, p0, p1):
        assert x["image"].shape[0] == 2
        for k in w:
            np.testing.assert_array_equal(np.concatenate([x[k], y[k]]), w[k], err_msg=k)


def test_batch_not_divisible_by_processes_is_an_error(source):
    with pytest.raises(ValueError, match="not divisible by the number of processes 3"):
        _iterator(source, batch_size=4, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        _iterator(source, batch_size=4, process_index=2, process_count=2)


def test_grain_checkpoint_api_and_close(source):
    it = _iterator(source, threads=2)
    assert isinstance(it, grain.DatasetIterator)
    next(it)
    state = it.get_state()
    json.dumps(state)
    it.close()
    with pytest.raises(ValueError):
        next(it)
