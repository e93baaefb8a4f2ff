"""Facts about booru tags shared by the tagger and the post-processing chain."""

from __future__ import annotations

# Kaomoji keep their underscores (from the WD tagger reference).
_KAOMOJI_LIST = "0_0 (o)_(o) +_+ +_- ._. <o>_<o> <|>_<|> =_= >_< 3_3 6_9 >_o @_@ ^_^ o_o u_u x_x"
KAOMOJI = frozenset([*_KAOMOJI_LIST.split(" "), "|_|", "||_||"])
