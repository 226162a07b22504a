"""Issue 10 acceptance: what real call sites get wrong -- constructor calls LR 1.32 itself refuses,
and the forward mistakes they invite -- is refused by the drop-ins too, as clearly or more."""

from __future__ import annotations

import pytest
import torch

vqp = pytest.importorskip("vector_quantize_pytorch")

import vqkernels.compat as compat  # noqa: E402

# Call sites that are wrong against LR 1.32 itself: the drop-in must refuse them too, with the
# same kind of error or a clearer one (an LR ``assert`` may become a ValueError/TypeError).
MISUSED_CALL_SITES = {
    # speech codec VCodec, public file (index id 29570170855): GroupedResidualVQ(dim, num_quantizers,
    # groups, codebook_size, learnable_codebook=True, requires_projection=True) -- no such keyword
    "vcodec-unknown-keyword": ("GroupedResidualVQ", dict(dim=8, num_quantizers=2, groups=2, codebook_size=16,
                                                         learnable_codebook=True, requires_projection=True)),
    # the same without the unknown keyword: LR's EMA is on by default, and LR asserts
    # "learnable codebook not compatible with EMA update"
    "vcodec-learnable-with-ema": ("GroupedResidualVQ", dict(dim=8, num_quantizers=2, groups=2, codebook_size=16,
                                                            learnable_codebook=True)),
    # bug-report script, public file (index id 53990521881): ResidualVQ(num_embeddings=512,
    # embedding_dim=64, num_codebooks...) -- taming/VQ-VAE names instead of LR's
    "rvq-taming-names": ("ResidualVQ", dict(num_embeddings=16, embedding_dim=8, num_quantizers=2)),
    # bug-report script, public file (index id 54369796045): ResidualSimVQ(num_embeddings=256,
    # embedding_dim=128, num_heads=8)
    "residual-simvq-wrong-names": ("ResidualSimVQ", dict(num_embeddings=16, embedding_dim=8, num_heads=2)),
}

_CLEARER = {AssertionError: (ValueError, TypeError, NotImplementedError)}


@pytest.mark.parametrize("name", list(MISUSED_CALL_SITES))
def test_misused_call_site_is_refused_like_lr(name):
    cls, kwargs = MISUSED_CALL_SITES[name]
    with pytest.raises(Exception) as theirs:
        getattr(vqp, cls)(**kwargs)
    with pytest.raises(Exception) as ours:
        getattr(compat, cls)(**kwargs)
    allowed = (theirs.type, *_CLEARER.get(theirs.type, ()))
    assert issubclass(ours.type, allowed), f"LR raises {theirs.type.__name__}, ours {ours.type.__name__}: {ours.value}"


# The mistakes these call sites invite (a channel-first encoder output into a channel-last layer, a
# wrong feature size, a padding mask off by one, integer tokens): LR fails deep inside (einsum /
# einops / a bare assert); ours names the argument and the expected shape or dtype.
MISUSED_FORWARDS = {
    "vq-channel-first-audio": ("VectorQuantize", dict(dim=16, codebook_size=32), (2, 16, 30), {}, "dim=16"),
    "vq-int-tokens": ("VectorQuantize", dict(dim=16, codebook_size=32), (2, 30, 16), dict(as_int=True), "float"),
    "vq-mask-off-by-one": ("VectorQuantize", dict(dim=16, codebook_size=32), (2, 30, 16),
                           dict(mask=torch.ones(2, 29, dtype=torch.bool)), "mask"),
    "vq-fmap-without-spatial-dims": ("VectorQuantize", dict(dim=16, codebook_size=32, accept_image_fmap=True),
                                     (2, 16, 30), {}, "4 dims"),
    "rvq-channel-first-audio": ("ResidualVQ", dict(dim=16, num_quantizers=2, codebook_size=32), (2, 16, 30), {},
                                "dim=16"),
    "grvq-wrong-dim": ("GroupedResidualVQ", dict(dim=16, groups=2, num_quantizers=2, codebook_size=32), (2, 30, 12),
                       {}, "dim=16"),
    "fsq-wrong-dim": ("FSQ", dict(levels=[8, 5, 5, 5]), (2, 30, 5), {}, "dimension of 4"),
    "lfq-wrong-dim": ("LFQ", dict(dim=8), (2, 30, 6), {}, "8"),
}


@pytest.mark.parametrize("name", list(MISUSED_FORWARDS))
def test_misused_forward_gets_a_clear_error(name):
    cls, kwargs, shape, fkw, names = MISUSED_FORWARDS[name]
    fkw = dict(fkw)
    x = torch.randn(*shape)
    if fkw.pop("as_int", False):
        x = torch.randint(0, 5, shape)
    with pytest.raises(Exception):  # noqa: B017  (LR: RuntimeError, EinopsError, NotImplementedError, assert)
        getattr(vqp, cls)(**kwargs)(x, **fkw)
    with pytest.raises((ValueError, TypeError), match=names):
        getattr(compat, cls)(**kwargs)(x, **fkw)
