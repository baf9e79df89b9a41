from .ops import *  # noqa  (placeholder while measuring the baseline)
from .ops import check_labels, sincos_2d_pos_embed  # noqa
