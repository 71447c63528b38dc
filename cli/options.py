"""Options shared by the commands that read data (compress, evaluate, finetune)."""

from __future__ import annotations

import click

from onnxstack.data import CHANNELS, LAYOUTS, ImageOptions


def _floats(ctx, param, value: str | None) -> tuple[float, ...] | None:
    """'0.485,0.456,0.406' -> (0.485, 0.456, 0.406)."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


IMAGE_OPTIONS = [
    click.option("--image-size", type=int, nargs=2, metavar="H W", help="Resize images to H x W [model input size]."),
    click.option("--channels", type=click.Choice(CHANNELS), default="auto", show_default=True, help="Image channels."),
    click.option("--pixel-scale", type=float, default=1 / 255, show_default="1/255",
                 help="Pixel values are multiplied by it."),
    click.option("--mean", callback=_floats, metavar="M[,M,M]", help="Subtracted after scaling, per channel [0]."),
    click.option("--std", callback=_floats, metavar="S[,S,S]", help="Divides after the mean, per channel [1]."),
    click.option("--layout", type=click.Choice(LAYOUTS), default="auto", show_default=True, help="Image tensor layout."),
]


def image_options(fn):
    """Decorator adding the image-folder options; the command receives them as keyword arguments."""
    for option in reversed(IMAGE_OPTIONS):
        fn = option(fn)
    return fn


def make_image_options(image_size, channels, pixel_scale, mean, std, layout) -> ImageOptions:
    return ImageOptions(size=image_size or None, channels=channels, scale=pixel_scale, mean=mean or (0.0,),
                        std=std or (1.0,), layout=layout)
