"""How many image tokens an image becomes, from its size alone (for budgeting before decoding pixels)."""

import math


def hd_grid(width: int, height: int, num_crops: int, crop_size: int = 336) -> tuple[int, int]:
    """Rows and columns of crops the HD transform cuts an image of this size into.

    The image is made wide (transposed if portrait), scaled so that `scale` crops fit across with
    `scale * ceil(scale / ratio) <= num_crops`, then padded to whole crops vertically.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    transposed = width < height
    w, h = (height, width) if transposed else (width, height)
    ratio = w / h
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= num_crops:
        scale += 1
    new_w = scale * crop_size
    new_h = int(new_w / ratio)
    rows = math.ceil(new_h / crop_size)
    cols = scale
    return (cols, rows) if transposed else (rows, cols)


def num_image_tokens(
    width: int, height: int, num_crops: int, crop_size: int = 336, tokens_per_side: int = 12
) -> int:
    """Tokens of one image: (h*w + 1) crops of tokens_per_side^2, one `glb_GN`, and a newline per grid row.

    With the real model (tokens_per_side 12): 420x300 at num_crops 4 -> 757, a square at 16 -> 2509.
    """
    rows, cols = hd_grid(width, height, num_crops, crop_size)
    t = tokens_per_side
    return (rows * cols + 1) * t * t + 1 + (rows + 1) * t
