"""Masks, N:M patterns and OWL allocation computed by hand (shear.sparse.masks, shear.sparse.owl, config)."""
import pytest
import torch

from shear.sparse.config import SparsifyConfig
from shear.sparse.masks import is_nm, mask_for, nm_mask, parse_pattern, unstructured_mask, wanda_scores
from shear.sparse.owl import outlier_ratio, owl_sparsities

# one row, two groups of four; the activations decide which weights survive
ROW = torch.tensor([[1.0, -2.0, 3.0, 0.5, 4.0, 1.0, -1.0, 2.0]])
X_NORM = torch.tensor([4.0, 1.0, 1.0, 2.0, 0.25, 3.0, 1.0, 2.0])


def test_wanda_2_4_on_a_row_with_known_activations():
    # scores |W| * ||X||: [4, 2, 3, 1 | 1, 3, 1, 4] -> keep columns 0, 2 and 5, 7
    assert wanda_scores(ROW, X_NORM).tolist() == [[4.0, 2.0, 3.0, 1.0, 1.0, 3.0, 1.0, 4.0]]
    keep = mask_for("wanda", ROW, pattern=(2, 4), x_norm=X_NORM)
    assert keep.tolist() == [[True, False, True, False, False, True, False, True]]
    # magnitude alone keeps the largest |W| of each group: columns 1, 2 and 4, 7
    assert mask_for("magnitude", ROW, pattern=(2, 4)).tolist() == [[False, True, True, False, True, False, False, True]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_are_exactly_n_of_m(n, m):
    w = torch.randn(16, 64)
    for method in ("magnitude", "wanda"):
        keep = mask_for(method, w, pattern=(n, m), x_norm=torch.rand(64) + 0.1)
        groups = keep.reshape(16, 64 // m, m).sum(-1)
        assert (groups == n).all() and is_nm(keep, n, m)
    assert not is_nm(torch.ones(16, 64, dtype=torch.bool), n, m)


def test_nm_needs_whole_groups():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_unstructured_counts_per_row_and_per_matrix():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0], [0.1, 0.2, 9.0, 8.0]])
    # Wanda: per row, int(4 * 0.5) = 2 removed in each row
    assert unstructured_mask(scores, 0.5, per_row=True).tolist() == [[True, False, True, False], [False, False, True, True]]
    # magnitude: over the matrix, the 4 smallest of 8 (0.1, 0.2, 1, 2) go, whatever their rows
    assert unstructured_mask(scores, 0.5, per_row=False).tolist() == [[True, False, True, False], [False, False, True, True]]
    assert unstructured_mask(scores, 0.25, per_row=False).tolist() == [[True, True, True, True], [False, False, True, True]]
    assert unstructured_mask(scores, 0.0, per_row=True).all()


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(" 4 : 8 ") == (4, 8)
    for bad in ("4:2", "2-4", "0:4", "2:2"):
        with pytest.raises(ValueError):
            parse_pattern(bad)


def test_outlier_ratio_by_hand():
    # mean of [1, 1, 1, 1, 10] is 2.8; above 3 x 2.8 = 8.4: one of five
    assert outlier_ratio([torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([10.0])], 3.0) == pytest.approx(0.2)


def test_owl_allocation_by_hand():
    # d = [0, 1/3, 2/3, 1], dev = -2 * 0.08 * (d - 0.5): more outliers -> less sparsity, mean preserved
    s = owl_sparsities([0.1, 0.2, 0.3, 0.4], 0.5, 0.08)
    assert s == pytest.approx([0.58, 0.5 + 0.16 / 6, 0.5 - 0.16 / 6, 0.42])
    assert sum(s) / 4 == pytest.approx(0.5)
    # skewed ratios: the spread would reach 0.12 > lambda, so deviations are scaled to at most lambda
    s = owl_sparsities([0.0, 0.0, 0.0, 1.0], 0.5, 0.08)
    assert s == pytest.approx([0.5 + 0.08 / 3] * 3 + [0.42])
    assert sum(s) / 4 == pytest.approx(0.5) and max(abs(x - 0.5) for x in s) <= 0.08 + 1e-12
    assert owl_sparsities([0.3, 0.3], 0.6, 0.1) == [0.6, 0.6]  # no spread: uniform
    with pytest.raises(ValueError, match="owl_lambda"):
        owl_sparsities([0.1, 0.2], 0.05, 0.1)


def test_config_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        SparsifyConfig(method="wanda")
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        SparsifyConfig(method="wanda", sparsity=0.5, pattern="2:4")
    with pytest.raises(ValueError, match="owl allocates unstructured"):
        SparsifyConfig(sparsity=None, pattern="2:4", allocation="owl")
    with pytest.raises(ValueError, match="multiple of M=8"):
        SparsifyConfig(pattern="4:8", blocksize=100)
    with pytest.raises(ValueError, match="unknown|extra"):
        SparsifyConfig(sparsity=0.5, sparsty=0.5)
    with pytest.raises(ValueError, match="valid regex"):
        SparsifyConfig(sparsity=0.5, targets=["re:("])
    assert SparsifyConfig(pattern=" 2 : 4").nm == (2, 4)


def test_config_refuses_calibration_text_magnitude_would_ignore():
    """magnitude reads |W| only: a calibration source with it is refused, not silently unused (with owl
    allocation the text is read: the Wanda-score outliers come from it)."""
    with pytest.raises(ValueError, match="magnitude uses no calibration text.*drop source"):
        SparsifyConfig(method="magnitude", sparsity=0.5, source="shakespeare")
    assert SparsifyConfig(method="magnitude", sparsity=0.5, allocation="owl", source="shakespeare").source
    assert SparsifyConfig(method="wanda", sparsity=0.5, source="shakespeare").source
