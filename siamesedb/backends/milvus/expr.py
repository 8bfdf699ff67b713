"""Milvus filter expressions: string literals and label filters for MilvusBackend (backend.py).

Label filters run inside Milvus (`label in ["a", "b"]`, each label a string literal with quotes, backslashes and line
breaks escaped the way Milvus's parser reads them), so k hits of the wanted labels come back whenever they exist.
"""

from __future__ import annotations

from siamesedb.backends.items import LabelFilter
from siamesedb.errors import InvalidInputError

# Milvus's expression parser knows only the short escapes (\\ \" \n \r \t ...): no \uXXXX, \xNN or octal, and a raw
# line break ends the literal. So: escape those five, and pass every other character (other controls too) as is.
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def label_literal(label: str) -> str:
    """`label` as a double-quoted string literal in a Milvus filter expression, read back by Milvus exactly
    (tests check quotes, backslashes, line breaks, other control characters and non-BMP Unicode)."""
    return '"' + label.translate(_ESCAPES) + '"'


def label_filter(labels: LabelFilter) -> str | None:
    """A Milvus boolean expression selecting `labels`; "" for no restriction; None when nothing can match."""
    if labels is None:
        return ""
    wanted = [labels] if isinstance(labels, str) else list(labels)
    if any(not isinstance(label, str) for label in wanted):
        raise InvalidInputError("labels to filter on must be strings")
    if not wanted:
        return None
    return f"label in [{', '.join(label_literal(label) for label in dict.fromkeys(wanted))}]"
