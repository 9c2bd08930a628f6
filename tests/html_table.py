"""Read the rows of an HTML table such as the freeze map, without a browser."""

from __future__ import annotations

from html.parser import HTMLParser


def table_rows(page: str) -> list[list[str]]:
    """Cell texts of each row of the outer table; nested tables are left out.

    A freeze map block row reads as its summary (the block's name), then its counts.
    """
    return _parse(page).rows


def folded_rows(page: str, first_cell: str) -> list[list[str]]:
    """Cell texts of the table folded inside the outer row whose first cell is ``first_cell``."""
    return _parse(page).nested[first_cell]


def _parse(page: str) -> _Rows:
    parser = _Rows()
    parser.feed(page)
    parser.close()
    return parser


class _Rows(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.rows: list[list[str]] = []
        self.nested: dict[str, list[list[str]]] = {}
        self._cells: dict[int, list[str] | None] = {}
        self._owner = ""

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.depth += 1
            if self.depth == 2:  # folded inside the outer cell read so far
                self._owner = "".join(self._cells.get(1) or []).strip()
                self.nested[self._owner] = []
        elif tag == "tr":
            self._current_rows().append([])
        elif tag in ("td", "th"):
            self._cells[self.depth] = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.depth -= 1
        elif tag in ("td", "th") and self._cells.get(self.depth) is not None:
            self._current_rows()[-1].append("".join(self._cells[self.depth]).strip())
            self._cells[self.depth] = None

    def handle_data(self, data: str) -> None:
        cell = self._cells.get(self.depth)
        if cell is not None:
            cell.append(data)

    def _current_rows(self) -> list[list[str]]:
        return self.rows if self.depth <= 1 else self.nested[self._owner]
