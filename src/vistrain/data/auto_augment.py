"""``augment.auto``: timm's named auto-augment policies, built by timm's own functions (no re-implementation).

The name picks the builder as timm's ``create_transform`` does (``timm.data.transforms_factory``): ``rand...`` ->
``rand_augment_transform``, ``augmix...`` -> ``augment_and_mix_transform`` (with translate_pct 0.3, as timm sets it),
any other -> ``auto_augment_transform`` (original, originalr, v0, v0r, 3a). The hyper-parameters are timm's too: the
model's mean as 0-255 ints for the pixels a geometric operation uncovers, ``translate_const`` 0.45 x the shorter
side. timm has no TrivialAugment: ``trivial`` is torchvision's ``TrivialAugmentWide`` with the same fill.

The operations act on the PIL image of the preprocessed uint8 pixels and draw from Python's ``random`` and NumPy's
global generator (torchvision's TrivialAugment from torch's), which ``dataset.item_rng`` seeds per item.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

AA_POLICIES = ("original", "originalr", "v0", "v0r", "3a")  # timm's auto_augment_policy names
FORMS = ("rand-m<M>[-n<N>][-mstd<S>][-inc1][-p<P>][-mmax<X>] (e.g. rand-m9-mstd0.5-inc1), "
         "augmix[-m<M>][-w<W>][-d<D>][-a<A>][-b1][-mstd<S>] (e.g. augmix-m5-w4-d2), "
         f"{' | '.join(AA_POLICIES)} [-mstd<S>], trivial")
# PIL resamples rotations and shears with these only; an area resize has no such twin (bilinear stands in)
_PIL_RESAMPLE = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "area": "bilinear"}


def hparams(size: Sequence[int], mean: Sequence[float], interpolation: str = "bilinear") -> dict[str, Any]:
    """timm's ``aa_params`` for images of ``size`` (H, W) normalised with ``mean`` (0-1), as
    ``transforms_imagenet_train`` derives them; ``interpolation``: the preprocessor's resize."""
    from timm.data.transforms import str_to_pil_interp

    return {"translate_const": int(min(size) * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean),
            "interpolation": str_to_pil_interp(_PIL_RESAMPLE[interpolation])}


def auto_augment(name: str, size: Sequence[int], mean: Sequence[float],
                 interpolation: str = "bilinear") -> Callable[[Any], Any]:
    """The policy ``name`` (a value of ``augment.auto``): PIL image -> PIL image of the same size."""
    params = hparams(size, mean, interpolation)
    if name == "trivial":
        from torchvision.transforms import v2 as T

        return T.TrivialAugmentWide(interpolation=T.InterpolationMode(_PIL_RESAMPLE[interpolation]),
                                    fill=list(params["img_mean"]))
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    if name.startswith("rand"):
        return rand_augment_transform(name, params)
    if name.startswith("augmix"):
        params["translate_pct"] = 0.3
        return augment_and_mix_transform(name, params)
    return auto_augment_transform(name, params)


def check_auto(name: str) -> str | None:
    """None when timm (or ``trivial``) accepts ``name``; else the problem, in one line with the accepted forms.
    timm's parsers refuse a name with ``assert``: the first section is checked here too, so the answer holds
    under ``python -O``."""
    head = name.split("-")[0]
    known = name == "trivial" or head in ("rand", "augmix", *AA_POLICIES)
    if known:
        try:
            auto_augment(name, (224, 224), (0.485, 0.456, 0.406))
        except (AssertionError, ValueError, KeyError, IndexError):
            known = False
    return None if known else f"'{name}' is not a policy timm's auto_augment accepts; valid: {FORMS}"
